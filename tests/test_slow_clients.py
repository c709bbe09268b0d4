"""Slow and malformed clients ("Safe to share", part 7): stalled bodies are cut off and hold no
thread (measured on a real `sdfarm api` process), lone surrogates are 422s, `sdfarm fetch` trusts
no path, the CLI strips terminal escapes, the dashboard's headers, Redis clients' timeouts."""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from producer.download import fetch_batch
from producer.processes import ManagedProcess, free_port
from producer.terminal import printable
from producer.views import job_text
from shared.config import Settings
from shared.errors import SdfarmError
from shared.keys import Keys
from shared.redis_client import BLOCKING_CALL_MAX_S, connect
from tests.fixtures_api import API_KEY, Api

JOB = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
STALLED_UPLOADS, PROBES = 40, 50  # uploads that stall; requests timed meanwhile, per route


def _stalled_upload(url: str, media: str, partial: bytes, declared: int = 100_000) -> socket.socket:
    """A connection that sends the headers and the start of a body, then nothing."""
    where = urlsplit(url)
    sock = socket.create_connection((where.hostname, where.port), timeout=30)
    head = (
        f"POST /v1/batches HTTP/1.1\r\nHost: {where.netloc}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: {media}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + partial)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """What the server sent before it closed the connection (a socket timeout if it never does)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _partial_ndjson() -> bytes:
    return (json.dumps(JOB) + "\n" + '{"prompt": "half a li').encode()


@pytest.mark.parametrize("media", ["application/x-ndjson", "application/json"])
def test_a_stalled_body_is_cut_off_with_408_and_nothing_is_written(
    start_api: Callable[..., Api], media: str
) -> None:
    # Given an API that waits at most 1 s for the next piece of a body
    api = start_api(body_idle_timeout_s=1.0)
    # When a client sends the start of a submission and then nothing
    started = time.monotonic()
    with _stalled_upload(api.url, media, _partial_ndjson()) as sock:
        answer = _answer(sock)
    # Then it is refused with 408 naming the setting, after about the timeout, and the
    # connection is closed (the rest of its body will never be read)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"body_idle_timeout_s" in answer
    assert 0.9 < time.monotonic() - started < 10
    # And no batch was written
    assert api.ledger.redis.zcard(Keys().batches()) == 0


def test_a_body_that_drips_past_body_timeout_s_is_cut_off(start_api: Callable[..., Api]) -> None:
    # Given an API that allows a whole body 2 s, and 1 s between pieces
    api = start_api(body_idle_timeout_s=1.0, body_timeout_s=2.0)
    # When a client sends a byte every 0.3 s, never idle for long
    with _stalled_upload(api.url, "application/x-ndjson", b"{") as sock:
        sock.settimeout(0.3)
        answer = b""
        for _ in range(40):
            try:
                sock.sendall(b" ")
                answer += sock.recv(65536)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                continue
            if answer:
                break
    # Then it is cut off by the whole-body deadline
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"body_timeout_s" in answer
    assert api.ledger.redis.zcard(Keys().batches()) == 0


@pytest.fixture
def api_process(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A real `sdfarm api` process on the test Redis, cutting stalled bodies off after 8 s."""
    port = free_port()
    env = {
        **os.environ,
        "SDFARM_REDIS_URL": redis_url,
        "SDFARM_STORAGE_URL": f"file://{tmp_path / 'images'}",
        "SDFARM_MODELS": "tiny=/nonexistent/tiny",
        "SDFARM_API_KEYS": API_KEY,
        "SDFARM_BODY_IDLE_TIMEOUT_S": "8",
    }
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "producer", "api", "--port", str(port), "--no-dispatcher"]
    process = ManagedProcess(
        "api",
        argv,
        log_dir=tmp_path,
        env=env,
        ready=lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200,
    )
    with process:
        process.wait_ready(60)
        yield url


def test_forty_stalled_uploads_leave_healthz_and_status_answering_fast(api_process: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=api_process, headers=headers, timeout=10) as http:
        # Given a farm holding one batch
        body = (json.dumps(JOB) + "\n").encode()
        submitted = http.post(
            "/v1/batches", content=body, headers={"Content-Type": "application/x-ndjson"}
        )
        assert submitted.status_code == 201, submitted.text
        batch_id = submitted.json()["batch_id"]
        # When 40 clients start NDJSON uploads and stall half way through a line
        stalled = [
            _stalled_upload(api_process, "application/x-ndjson", _partial_ndjson())
            for _ in range(STALLED_UPLOADS)
        ]
        try:
            time.sleep(0.5)  # every upload has reached the route and waits for bytes
            # Then /healthz and the batch's status answer in milliseconds meanwhile
            seconds: dict[str, list[float]] = {"healthz": [], "status": []}
            for _ in range(PROBES):
                for name, path in (("healthz", "/healthz"), ("status", f"/v1/batches/{batch_id}")):
                    start = time.perf_counter()
                    assert http.get(path).status_code == 200
                    seconds[name].append(time.perf_counter() - start)
            p99 = {name: statistics.quantiles(s, n=100)[98] for name, s in seconds.items()}
            print(f"p99 with {STALLED_UPLOADS} stalled uploads (s): {p99}")
            assert p99["healthz"] < 0.1 and p99["status"] < 0.1, p99
            # And the stalled uploads are cut off by the idle timeout, each with a 408
            answers = [_answer(sock) for sock in stalled]
        finally:
            for sock in stalled:
                sock.close()
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[0][:200]
        # And nothing they sent was written: the farm still holds its one batch
        listed = http.get("/v1/batches").json()["batches"]
        assert [b["batch_id"] for b in listed] == [batch_id]


def test_a_lone_surrogate_in_a_prompt_is_422_naming_the_field(api: Api) -> None:
    # Given a prompt holding "\ud800" as a raw JSON escape, in a JSON and in an NDJSON body
    line = '{"prompt": "a fox \\ud800 in snow", "width": 64, "height": 64}'
    bodies = {
        "application/json": ('{"jobs": [' + line + "]}", "jobs.0.prompt"),
        "application/x-ndjson": (line + "\n", "prompt"),
    }
    for media, (body, field) in bodies.items():
        # When it is submitted
        response = api.http.post(
            "/v1/batches", content=body.encode(), headers={"Content-Type": media}
        )
        # Then it is a 422 naming the field and what is wrong with it, never a 500
        assert response.status_code == 422, (media, response.text)
        problem = response.json()["problems"][0]
        assert problem["field"] == field
        assert "lone surrogate" in problem["message"]
        assert "\\ud800" in problem["value"]
    # And an unknown field whose very name is one is refused with the name written out
    body = '{"prompt": "a fox", "\\udfff": 1}\n'
    response = api.http.post(
        "/v1/batches", content=body.encode(), headers={"Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 422 and response.json()["problems"][0]["value"] == "\\udfff"
    assert api.ledger.redis.zcard(Keys().batches()) == 0


class _HostileClient:
    """A farm that answers a fetch with job ids that are paths."""

    def __init__(self, job_ids: list[Any]) -> None:
        self.job_ids = job_ids
        self.images_asked: list[str] = []

    def jobs(self, batch_id: str, state: str | None = None) -> Iterator[dict[str, Any]]:
        for job_id in self.job_ids:
            yield {"job_id": job_id, "state": "succeeded", "result": {"bytes": 3}}

    def image(self, job_id: str) -> bytes:
        self.images_asked.append(job_id)
        return b"png"

    def manifest(self, batch_id: str) -> Iterator[dict[str, Any]]:
        return iter([])


BATCH = "b" + "0" * 20


@pytest.mark.parametrize(
    "job_id",
    ["../../escaped", "/tmp/escaped", f"{BATCH}-1/../../escaped", "b" + "1" * 20 + "-0", 7],
)
def test_fetch_refuses_job_ids_that_are_not_ids_of_the_batch(tmp_path: Path, job_id: Any) -> None:
    # Given a server that lists a job id that is not one of the batch's
    client = _HostileClient([job_id])
    out = tmp_path / "deep" / "out"
    # When its batch is fetched
    with pytest.raises(SdfarmError, match="not one of its job ids"):
        fetch_batch(client, BATCH, out)  # type: ignore[arg-type]
    # Then nothing was asked for or written anywhere under the temporary folder but `out`
    assert client.images_asked == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_fetch_writes_real_job_ids_inside_the_out_folder(tmp_path: Path) -> None:
    # Given a server that lists proper job ids
    client = _HostileClient([f"{BATCH}-0", f"{BATCH}-12"])
    # When the batch is fetched
    report = fetch_batch(client, BATCH, tmp_path)  # type: ignore[arg-type]
    # Then each image lands in the folder under its id
    assert {p.name for p in report.downloaded} == {f"{BATCH}-0.png", f"{BATCH}-12.png"}
    assert all(p.parent == tmp_path for p in report.downloaded)


def test_the_cli_strips_terminal_control_sequences_from_what_it_prints() -> None:
    # Given a job whose prompt and error hold escape sequences and control characters
    evil = "a fox\x1b[2J\x1b]0;owned\x07 in\r snow\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\\x9b31m"
    job = {
        "job_id": f"{BATCH}-0",
        "state": "failed",
        "attempts": 1,
        "spec": {"prompt": evil, "seed": 1, "width": 64, "height": 64, "steps": 2}
        | {"scheduler": "lms", "guidance": 7.5},
        "error": "boom\x1b[31m red\x07",
    }
    # When the CLI shows it
    text = job_text(job)
    # Then no control character but newlines survives, and the readable text does
    assert not any((ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in text)
    assert "prompt: a fox in snowlink" in text
    assert "error: boom red" in text
    # And tabs and newlines in a message are kept
    assert printable("one\ttwo\nthree\x00") == "one\ttwo\nthree"


def test_the_dashboard_sends_a_csp_that_allows_its_image_store(api: Api) -> None:
    # When the dashboard and its files are fetched (no key is needed for them)
    for path in ("/", "/dashboard/app.js", "/dashboard/style.css"):
        response = httpx.get(f"{api.url}{path}")
        assert response.status_code == 200
        # Then each forbids framing and sniffing, and allows only the page's own files
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        csp = dict(
            part.strip().split(" ", 1)
            for part in response.headers["Content-Security-Policy"].split(";")
        )
        assert csp["default-src"] == "'self'"
        assert csp["frame-ancestors"] == "'none'"
        assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
        # And images from the store's presigned URLs (its endpoint) and blob: URLs
        store = urlsplit(api.settings.s3_endpoint_url or "")
        assert csp["img-src"] == f"'self' blob: {store.scheme}://{store.netloc}"
    # And the page itself has no inline script or style the policy would block
    page = httpx.get(api.url).text
    assert "<script>" not in page and "<style" not in page and "style=" not in page


def test_redis_clients_have_timeouts_that_outlast_the_farms_blocking_calls(redis_url: str) -> None:
    # Given the farm's Redis client with its default settings
    settings = Settings(redis_url=redis_url)
    client = connect(settings)
    try:
        kwargs = client.connection_pool.connection_kwargs
        # Then every socket operation has a timeout, longer than the longest blocking call
        assert kwargs["socket_timeout"] == settings.redis_socket_timeout_s > BLOCKING_CALL_MAX_S
        assert kwargs["socket_connect_timeout"] == settings.redis_connect_timeout_s
        assert kwargs["health_check_interval"] == settings.redis_health_check_interval_s
        # And a blocking pop of the longest kind returns empty instead of timing out
        assert client.blpop(["nothing-here"], timeout=BLOCKING_CALL_MAX_S) is None
    finally:
        client.close()
    # And a socket timeout that would cut such a call off is refused
    with pytest.raises(ValueError, match="redis_socket_timeout_s"):
        Settings(redis_socket_timeout_s=BLOCKING_CALL_MAX_S)
