"""One suite for both clients: `FarmClient` and `AsyncFarmClient` (driven through a small sync
facade that runs each call on one event loop) against a real API, Redis and S3, and real workers.

Every test runs once per client; a behaviour that one client lacks fails its half.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.async_client import AsyncFarmClient
from producer.client import FarmClient
from producer.download import png_intact
from producer.processes import free_port
from shared.errors import AccessDenied, FarmUnreachable, InvalidJob, UnknownId
from shared.jobs import JobState
from shared.storage import image_key, open_storage
from tests.fixtures_api import API_KEY, Api
from tests.fixtures_farm import FarmEnv

SMALL = {"width": 64, "height": 64, "steps": 4}


class SyncFacade:
    """`AsyncFarmClient` with `FarmClient`'s calling convention: each coroutine runs on one
    long-lived event loop (the connection pool belongs to it); async generators become lists."""

    def __init__(self, api_url: str, api_key: str | None = None, **options: Any) -> None:
        self._runner = asyncio.Runner()
        self.inner = self._runner.run(_opened(api_url, api_key, options))

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            outcome = method(*args, **kwargs)
            if inspect.isasyncgen(outcome):
                return self._runner.run(_listed(outcome))
            return self._runner.run(outcome)

        return call

    def __enter__(self) -> SyncFacade:
        return self

    def __exit__(self, *exc: object) -> None:
        self._runner.run(self.inner.close())
        self._runner.close()


async def _opened(api_url: str, api_key: str | None, options: dict[str, Any]) -> AsyncFarmClient:
    return AsyncFarmClient(api_url, api_key, **options)


async def _listed(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


@pytest.fixture(params=["sync", "async"])
def open_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Opens a client of the kind the test runs with; closes them all afterwards."""
    opened: list[Any] = []

    def open_(api_url: str, api_key: str | None = API_KEY, **options: Any) -> Any:
        kind = FarmClient if request.param == "sync" else SyncFacade
        opened.append(kind(api_url, api_key, **options))
        return opened[-1]

    yield open_
    for client in opened:
        client.__exit__(None, None, None)


def _finished_batch(api: Api, count: int) -> tuple[str, list[str]]:
    """A batch whose jobs 'rendered': real PNGs in S3, jobs succeeded in the ledger."""
    submitted = api.http.post("/v1/batches", json={"prompts": [f"tile {i}" for i in range(count)]})
    batch_id, job_ids = submitted.json()["batch_id"], submitted.json()["job_ids"]
    storage = open_storage(api.settings.storage_url, endpoint_url=api.settings.s3_endpoint_url)
    for index, job_id in enumerate(job_ids):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (index * 40, 90, 200)).save(buffer, format="PNG")
        key = image_key(storage.prefix, batch_id, job_id)
        storage.put(key, buffer.getvalue(), "image/png")
        api.ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": "w"})
        result = {"key": key, "uri": storage.describe(key), "bytes": len(buffer.getvalue())}
        api.ledger.force(job_id, [JobState.RUNNING], JobState.SUCCEEDED, {"result": result})
    return batch_id, job_ids


def test_a_batch_renders_waits_with_progress_and_fetches_as_pngs(
    farm_env: FarmEnv,
    serve_api: Callable[..., str],
    open_client: Callable[..., Any],
    tmp_path: Path,
) -> None:
    # Given a farm with one worker of the tiny model
    farm_env.start_worker()
    api_url = serve_api(farm_env.settings)
    farm_env.wait_for_workers(1)
    client = open_client(api_url, None)
    # When three prompts are submitted and waited for, with a progress callback
    submitted = client.submit(prompts=["a fox", "a boat", "a kite"], defaults=SMALL)
    seen: list[dict[str, int]] = []
    status = client.wait(submitted["batch_id"], poll_s=0.1, timeout_s=240, on_update=seen.append)
    # Then every job succeeded, and the callback saw each poll up to the final one
    assert status["counts"]["succeeded"] == 3, status
    assert seen[-1] == status
    assert len(seen) >= 2
    job = client.job(submitted["job_ids"][0])
    assert (job["state"], job["spec"]["prompt"]) == ("succeeded", "a fox")
    # When the batch is fetched, with a callback per file
    files: list[tuple[Path, bool]] = []
    out = tmp_path / "out"
    report = client.fetch(submitted["batch_id"], out, on_file=lambda p, i: files.append((p, i)))
    # Then three whole PNGs of the recorded sizes lie in the folder, with the manifest
    assert sorted(p.stem for p in report.images) == sorted(submitted["job_ids"])
    assert [intact for _, intact in files] == [False, False, False]
    for path in report.images:
        size = client.job(path.stem)["result"]["bytes"]
        assert png_intact(path, size)
    assert len((out / "manifest.ndjson").read_text().splitlines()) == 3


def test_a_second_fetch_downloads_only_what_is_damaged(
    api: Api, open_client: Callable[..., Any], tmp_path: Path
) -> None:
    # Given a finished batch of three images, fetched once
    batch_id, job_ids = _finished_batch(api, 3)
    client = open_client(api.url)
    client.fetch(batch_id, tmp_path)
    # When one file is cut short and the batch is fetched again
    damaged = tmp_path / f"{job_ids[1]}.png"
    damaged.write_bytes(damaged.read_bytes()[:-20])
    report = client.fetch(batch_id, tmp_path)
    # Then only that one was downloaded again
    assert report.downloaded == [damaged]
    assert len(report.skipped) == 2
    assert [line["job_id"] for line in client.manifest(batch_id)] == job_ids


def test_cancel_then_retry_queues_the_jobs_again(api: Api, open_client: Callable[..., Any]) -> None:
    # Given a queued batch of three jobs (no worker runs them)
    client = open_client(api.url)
    submitted = client.submit([{"prompt": f"a cat {i}"} for i in range(3)])
    batch_id, first = submitted["batch_id"], submitted["job_ids"][0]
    # When one job, then the whole batch, is cancelled
    one = client.cancel(first)
    rest = client.cancel_batch(batch_id)
    # Then each answer says what it found and did
    assert one["state"] == "cancelled"
    assert (rest["cancelled"], rest["stopping"]) == (2, 0)
    assert client.batch(batch_id)["counts"]["cancelled"] == 3
    # And a retry queues all three again
    retried = client.retry(batch_id)
    assert retried["requeued"] == 3
    assert client.batch(batch_id)["counts"]["queued"] == 3
    assert [job["job_id"] for job in client.jobs(batch_id, page=2)] == submitted["job_ids"]


def test_a_streamed_submission_is_one_batch(api: Api, open_client: Callable[..., Any]) -> None:
    # When 1,200 jobs are streamed as NDJSON (three pieces), with an Idempotency-Key
    client = open_client(api.url)
    key = secrets.token_hex(8)

    def dunes() -> Iterator[dict[str, Any]]:
        return ({"prompt": f"a dune {i}"} for i in range(1200))

    submitted = client.submit_stream(dunes(), idempotency_key=key, priority=7)
    # Then they are one batch, and the same body with the same key answers with that batch
    assert len(submitted["job_ids"]) == 1200
    assert client.batch(submitted["batch_id"])["priority"] == 7
    again = client.submit_stream(dunes(), idempotency_key=key, priority=7)
    assert (again["batch_id"], again["replayed"]) == (submitted["batch_id"], True)


def test_an_uploaded_init_image_is_one_reference_a_job_can_name(
    api: Api, open_client: Callable[..., Any], tmp_path: Path
) -> None:
    # Given a PNG on disk
    path = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (30, 120, 60)).save(path)
    client = open_client(api.url)
    # When it is uploaded as a file, then as bytes
    ref = client.upload(path)
    again = client.upload(path.read_bytes())
    # Then both give the one reference, and a job naming it is accepted with it
    assert ref == again and ref.startswith("upload:"), ref
    submitted = client.submit([{"prompt": "a field", "init_image": ref, "strength": 0.5}])
    assert client.job(submitted["job_ids"][0])["spec"]["init_image"] == ref


def test_errors_come_back_as_the_farms_error_tree(
    api: Api, open_client: Callable[..., Any]
) -> None:
    client = open_client(api.url)
    # A refused field names itself
    with pytest.raises(InvalidJob) as refused:
        client.submit(prompts=["a cat"], defaults={"steps": 0})
    assert any(problem.get("field") == "steps" for problem in refused.value.details), refused
    # An unknown id, a wrong key and a farm that is not there
    with pytest.raises(UnknownId):
        client.batch("b" + "0" * 20)
    with pytest.raises(AccessDenied):
        open_client(api.url, "wrong-key").batches()
    with pytest.raises(FarmUnreachable):
        open_client(f"http://127.0.0.1:{free_port()}").health()


def test_a_wait_past_its_timeout_says_how_far_the_batch_got(
    api: Api, open_client: Callable[..., Any]
) -> None:
    client = open_client(api.url)
    batch_id = client.submit(prompts=["a slow snail"])["batch_id"]
    with pytest.raises(TimeoutError, match=r"not finished after 0.3s: .*'queued': 1"):
        client.wait(batch_id, poll_s=0.05, timeout_s=0.3)


def test_the_async_client_awaits_coroutine_callbacks_and_async_job_streams(api: Api) -> None:
    # Given a finished batch
    batch_id, _ = _finished_batch(api, 2)

    async def jobs() -> AsyncIterator[dict[str, Any]]:
        for i in range(3):
            await asyncio.sleep(0)
            yield {"prompt": f"a river {i}"}

    async def scenario() -> tuple[list[int], int, dict[str, Any]]:
        updates: list[int] = []

        async def on_update(status: Any) -> None:
            await asyncio.sleep(0)
            updates.append(status["counts"]["succeeded"])

        async with AsyncFarmClient(api.url, API_KEY) as farm:
            # When waits run side by side with an async callback, and jobs stream from an
            # async generator
            waited = await asyncio.gather(*(farm.wait(batch_id, on_update=on_update) for _ in "ab"))
            streamed = await farm.submit_stream(jobs())
            return updates, len(streamed["job_ids"]), waited[0]

    updates, streamed, status = asyncio.run(scenario())
    # Then each callback was awaited, and the async generator's jobs became one batch
    assert updates == [2, 2]
    assert status["counts"]["succeeded"] == 2
    assert streamed == 3
