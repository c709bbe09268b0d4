"""Scenario 16: 40 uploads that stall half way, while a batch renders.

The API is restarted with a short body idle timeout (`SDFARM_BODY_IDLE_TIMEOUT_S`). While a batch
renders, 40 connections each send the headers and the start of a body, then nothing: half of
them an NDJSON submission (`POST /v1/batches`, cut in the middle of a line), half a PNG
(`POST /v1/uploads`, its signature and a few bytes). Meanwhile `/healthz` and the batch's status
are timed; their p99 must stay under 100 ms (the reads hold no thread, tests/test_slow_clients.py
measures the same on an idle API). Each stalled upload must end in a 408 when the timeout cuts it
off, none may create a batch, and the batch ends whole.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from urllib.parse import urlsplit

import httpx

from tests.faults.harness import TINY, FaultFarm, Row
from tests.faults.infra import BRISK

IDLE_TIMEOUT_S = 5.0  # long enough for the probes to run while every upload is still stalled
STALLED = 40  # as many NDJSON submissions as PNG uploads
PROBES = 50  # requests timed per route
P99_LIMIT_S = 0.1
_PNG_START = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def stalled_uploads(ff: FaultFarm) -> Row:
    """16. 40 stalled uploads while a batch renders: /healthz and status stay fast; all 408."""
    _restart_api(ff, {"SDFARM_BODY_IDLE_TIMEOUT_S": f"{IDLE_TIMEOUT_S:g}"})
    try:
        batch_id, _ = ff.submit(3 * ff.size.jobs, BRISK, tag="stalled")
        ff.wait_until(lambda: ff.ledger.batch(batch_id)["counts"]["running"], "the batch to render")
        batches = int(ff.redis.zcard(ff.keys.batches()))
        opened = time.monotonic()
        stalled = [_stall(ff, "/v1/batches" if i % 2 else "/v1/uploads") for i in range(STALLED)]
        try:
            time.sleep(0.5)  # every upload has reached its route and waits for bytes
            p99 = _probe(ff, batch_id)
            probed_s = time.monotonic() - opened
            answers = [_answer(sock) for sock in stalled]
            cut_s = time.monotonic() - opened
        finally:
            for sock in stalled:
                sock.close()
        during = ff.ledger.batch(batch_id)["counts"]
        created = int(ff.redis.zcard(ff.keys.batches())) - batches
    finally:
        _restart_api(ff, {})
    ff.wait_done(batch_id)
    cut = sum(1 for a in answers if a.startswith(b"HTTP/1.1 408 "))
    row = ff.tally(
        f"{STALLED} stalled uploads while a batch renders",
        batch_id,
        None,
        notes=f"p99 /healthz {p99['healthz'] * 1000:.0f} ms, batch status "
        f"{p99['status'] * 1000:.0f} ms (probed for {probed_s:.1f} s); {cut}/{STALLED} cut off "
        f"with 408 within {cut_s:.1f} s (idle timeout {IDLE_TIMEOUT_S:g} s); "
        f"{created} batches created by them; the batch {during['succeeded']}/"
        f"{sum(during.values())} done when they were cut off",
    )
    row.details |= {"p99": p99, "cut": cut, "created": created, "during": during}
    if probed_s >= IDLE_TIMEOUT_S:
        raise AssertionError(f"the probes outlasted the stalled uploads: {row.notes}")
    if max(p99.values()) >= P99_LIMIT_S or cut != STALLED or created:
        raise AssertionError(f"{row.notes}; first answer {answers[0][:120]!r}")
    return row


def _restart_api(ff: FaultFarm, extra_env: dict[str, str]) -> None:
    """The farm's API again, with `extra_env` on top of the farm's settings."""
    api = ff.farm.api
    api.stop()
    api.env = {**ff.farm.env, **extra_env}
    api.start()
    api.wait_ready(60)


def _stall(ff: FaultFarm, path: str) -> socket.socket:
    """A connection that sends the headers and the start of a body, then nothing."""
    if path == "/v1/batches":
        media, partial = (
            "application/x-ndjson",
            (json.dumps(TINY) + '\n{"prompt": "half a').encode(),
        )
    else:
        media, partial = "image/png", _PNG_START
    where = urlsplit(ff.farm.api_url)
    sock = socket.create_connection((where.hostname, where.port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\n"
        f"Authorization: Bearer {ff.farm.api_key}\r\nContent-Type: {media}\r\n"
        "Content-Length: 100000\r\n\r\n"
    )
    sock.sendall(head.encode() + partial)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """What the server sent before it closed the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _probe(ff: FaultFarm, batch_id: str) -> dict[str, float]:
    """The p99 latency, in seconds, of /healthz and of the batch's status."""
    seconds: dict[str, list[float]] = {"healthz": [], "status": []}
    headers = {"Authorization": f"Bearer {ff.farm.api_key}"}
    with httpx.Client(base_url=ff.farm.api_url, headers=headers, timeout=10) as http:
        for _ in range(PROBES):
            for name, path in (("healthz", "/healthz"), ("status", f"/v1/batches/{batch_id}")):
                start = time.perf_counter()
                answer = http.get(path)
                seconds[name].append(time.perf_counter() - start)
                if answer.status_code != 200:
                    raise AssertionError(f"GET {path}: {answer.status_code} {answer.text[:200]}")
    return {name: statistics.quantiles(s, n=100)[98] for name, s in seconds.items()}
