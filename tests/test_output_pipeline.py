"""The output pipeline: chunk k is stored while chunk k+1 renders, bounded, and loses nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.services import S3Service
from shared.config import Settings
from shared.ids import batch_of, new_batch_id
from shared.jobs import JobSpec, JobState
from shared.ledger import Ledger
from shared.storage import S3Storage, Storage, image_key
from worker.chunk import WorkerContext, process_chunk
from worker.models import LoadedModel, load_model
from worker.output import OutputPipeline

STORE_DELAY_S = 0.3  # per image: a store far slower than a 64x64 render, so overlap shows


class SlowStore:
    """The real S3 store behind a slow link: every put waits first (a far-away bucket)."""

    def __init__(self, inner: S3Storage, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.prefix = inner.prefix

    def put(self, key: str, data: bytes, content_type: str) -> None:
        time.sleep(self.delay_s)
        self.inner.put(key, data, content_type)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def url(self, key: str, expires_s: int) -> str | None:
        return self.inner.url(key, expires_s)

    def describe(self, key: str) -> str:
        return self.inner.describe(key)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


@pytest.fixture
def s3(s3_service: S3Service, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_service.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_service.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_service.region)
    prefix = f"output-{int(time.time() * 1000)}"
    return S3Storage(s3_service.bucket, prefix, endpoint_url=s3_service.endpoint_url)


@pytest.fixture
def ledger(redis_url: str) -> Iterator[Ledger]:
    client = redis.Redis.from_url(redis_url)
    yield Ledger(client, status_ttl_s=3600, lease_s=30)
    client.close()


def _context(
    ledger: Ledger, storage: Storage, model: LoadedModel, output: OutputPipeline | None
) -> WorkerContext:
    settings = Settings(redis_url="redis://unused", models={"tiny": model.path}, lease_s=30)
    return WorkerContext(
        settings=settings,
        ledger=ledger,
        storage=storage,
        models={"tiny": model},
        worker_id="test-worker",
        output=output,
    )


def _submit(ledger: Ledger, count: int) -> list[str]:
    specs = [
        JobSpec(prompt=f"a lighthouse {i}", model="tiny", width=64, height=64, steps=2, seed=i)
        for i in range(count)
    ]
    return ledger.create_batch(new_batch_id(), specs)


def test_a_chunk_is_stored_while_the_next_chunk_renders(
    ledger: Ledger, s3: S3Storage, tiny_model: LoadedModel
) -> None:
    # Given a worker whose store is slow, with an output pipeline
    output = OutputPipeline(depth=1)
    ctx = _context(ledger, SlowStore(s3, STORE_DELAY_S), tiny_model, output)
    first, second = _submit(ledger, 2), _submit(ledger, 2)

    # When two chunks are processed one after the other, and the pipeline is then closed
    process_chunk(ctx, first, "tiny")
    process_chunk(ctx, second, "tiny")
    output.close()

    # Then the second chunk started rendering before the first chunk's last image was stored
    records = {job_id: ledger.job(job_id) for job_id in first + second}
    first_stored = max(float(records[j]["finished_at"]) for j in first)
    second_started = min(float(records[j]["started_at"]) for j in second)
    assert second_started < first_stored

    # And every job succeeded with its PNG in S3
    for job_id, record in records.items():
        assert record["state"] == JobState.SUCCEEDED.value
        key = image_key(s3.prefix, batch_of(job_id), job_id)
        assert s3.get(key).startswith(b"\x89PNG")


def test_a_job_waiting_to_be_stored_is_running_not_succeeded(
    ledger: Ledger, s3: S3Storage, tiny_model: LoadedModel
) -> None:
    # Given a pipeline whose thread is held by earlier work (as if the process froze there)
    output = OutputPipeline(depth=1)
    release = threading.Event()
    output.submit("earlier", release.wait)
    ctx = _context(ledger, s3, tiny_model, output)
    job_ids = _submit(ledger, 2)

    # When a chunk renders and its store work waits in the pipeline
    process_chunk(ctx, job_ids, "tiny")

    # Then its jobs are still `running` with a lease, and no object exists yet: a crash now
    # leaves them to the reconciler, never marked done without an image
    try:
        for job_id in job_ids:
            assert ledger.job(job_id)["state"] == JobState.RUNNING.value
            assert not s3.exists(image_key(s3.prefix, batch_of(job_id), job_id))
        assert set(ledger.expired_leases(time.time() + 60)) >= set(job_ids)
    finally:
        release.set()
        output.close()

    # And once the pipeline drains (an orderly stop), they succeed with their images
    for job_id in job_ids:
        assert ledger.job(job_id)["state"] == JobState.SUCCEEDED.value
        assert s3.exists(image_key(s3.prefix, batch_of(job_id), job_id))


def test_a_full_pipeline_makes_the_sampler_wait_so_memory_stays_flat() -> None:
    # Given a pipeline of depth 1 and store work that takes a while
    output = OutputPipeline(depth=1)
    alive = 0
    most_alive = 0
    lock = threading.Lock()

    def chunk_of_images() -> None:  # stands for the decoded images a unit holds until stored
        nonlocal alive
        time.sleep(0.05)
        with lock:
            alive -= 1

    # When six chunks are submitted as fast as the sampler can
    for index in range(6):
        with lock:
            alive += 1
            most_alive = max(most_alive, alive)
        output.submit(f"chunk-{index}", chunk_of_images)
    output.close()

    # Then never more than depth + 1 chunks (waiting plus being stored) were held at once
    assert most_alive <= 1 + 1 + 1  # waiting, being stored, and the one just submitted
    assert output.stats.chunks == 6
    # And the sampler did wait for room: the back pressure that bounds memory
    assert output.stats.blocked_s > 0.1


def test_a_store_that_raises_does_not_stop_the_next_ones() -> None:
    # Given a pipeline where one unit of store work fails (Redis down while reporting, say)
    output = OutputPipeline(depth=2)
    done: list[str] = []

    def broken() -> None:
        raise ConnectionError("redis went away")

    # When it is followed by healthy work
    output.submit("bad", broken)
    output.submit("good", lambda: done.append("good"))
    output.close()

    # Then the failure is counted and the next unit still ran
    assert output.stats.failures == 1
    assert done == ["good"]


def test_a_closed_pipeline_refuses_new_work_by_name() -> None:
    output = OutputPipeline()
    output.close()
    with pytest.raises(RuntimeError, match="closed; cannot store chunk b1"):
        output.submit("b1", lambda: None)
