"""The worker's chunk path against a real Redis: hand-backs honour cancels, one job's bad input
stays its own, a store that refuses fails at once, and failures carry their reason code."""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

from producer.services import S3Service
from shared.config import Settings
from shared.errors import StorageError, StorageRefused
from shared.ids import new_batch_id
from shared.jobs import JobSpec, JobState
from shared.ledger import Ledger
from shared.storage import FileStorage, S3Storage
from worker.chunk import process_chunk
from worker.context import WorkerContext
from worker.models import LoadedModel, load_model

SPEC = {"model": "tiny", "width": 64, "height": 64, "steps": 2}


class FailingStore(FileStorage):
    """A file store whose puts fail with `error`; `before_fail` runs first (a user's action)."""

    def __init__(self, root: Path, error: StorageError, before_fail: object = None) -> None:
        super().__init__(root)
        self.error = error
        self.before_fail = before_fail

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if callable(self.before_fail):
            self.before_fail()
        raise self.error


class CancellingLedger(Ledger):
    """The real ledger, with a user cancelling the chunk's jobs right after they were claimed."""

    def renew_leases(
        self, worker: str, job_ids: Sequence[str], progress: tuple[int, int] | None = None
    ) -> set[str]:
        for job_id in job_ids:
            self.request_cancel(job_id)
        return super().renew_leases(worker, job_ids, progress)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _context(
    ledger: Ledger, storage: FileStorage, model: LoadedModel, **settings: object
) -> WorkerContext:
    values: dict[str, object] = {"redis_url": "redis://unused", "models": {"tiny": model.path}}
    return WorkerContext(
        settings=Settings(**(values | settings)),
        ledger=ledger,
        storage=storage,
        models={"tiny": model},
        worker_id="test-worker",
    )


def _submit(ledger: Ledger, count: int) -> list[str]:
    specs = [
        JobSpec.model_validate({**SPEC, "prompt": f"a fox {i}", "seed": i}) for i in range(count)
    ]
    return ledger.create_batch(new_batch_id(), specs)


def _png_header(width: int, height: int) -> bytes:
    """A 69-byte PNG that claims `width` x `height` pixels and holds none."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + body + end


def test_a_running_job_cancelled_then_handed_back_for_storage_ends_cancelled(
    client: redis.Redis, tmp_path: Path, tiny_model: LoadedModel
) -> None:
    # Given a store that is down, and a user who cancels the job just as its upload fails
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    (job_id,) = _submit(ledger, 1)
    store = FailingStore(
        tmp_path, StorageError("connection refused"), lambda: ledger.request_cancel(job_id)
    )
    ctx = _context(ledger, store, tiny_model, storage_put_attempts=1)
    # When the worker renders it and hands it back because the store is down
    outcome = process_chunk(ctx, [job_id], "tiny")
    # Then it ends cancelled, never queued to render again
    record = ledger.job(job_id)
    assert record["state"] == JobState.CANCELLED.value, record
    assert outcome.cancelled == [job_id]
    assert ledger.take_chunk("tiny", 8) is None


def test_a_running_job_cancelled_then_handed_back_at_shutdown_ends_cancelled(
    client: redis.Redis, tmp_path: Path, tiny_model: LoadedModel
) -> None:
    # Given a worker that is shutting down (its grace is spent), and a user who cancels the
    # chunk's jobs as soon as the worker has claimed them
    ledger = CancellingLedger(client, status_ttl_s=3600, lease_s=30)
    job_ids = _submit(ledger, 2)
    ctx = _context(ledger, FileStorage(tmp_path), tiny_model)
    ctx.state.stop_by = time.monotonic() - 1
    # When the chunk is handed back because the worker stops
    process_chunk(ctx, job_ids, "tiny")
    # Then both jobs end cancelled, none of them queued again
    assert [ledger.job(j)["state"] for j in job_ids] == ["cancelled", "cancelled"]
    assert ledger.batch(job_ids[0].rsplit("-", 1)[0])["counts"]["queued"] == 0


def test_a_job_whose_stored_spec_cannot_be_read_fails_alone_and_its_neighbours_render(
    client: redis.Redis, tmp_path: Path, tiny_model: LoadedModel
) -> None:
    # Given a chunk of three jobs, the middle one's stored spec holding an init image whose
    # 69-byte header claims 20000x20000 pixels (written past the API, as an old farm could)
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    job_ids = _submit(ledger, 3)
    bad = job_ids[1]
    spec = json.loads(client.hget(ledger.keys.job(bad), "spec") or b"{}")
    spec["init_image"] = base64.b64encode(_png_header(20000, 20000)).decode()
    client.hset(ledger.keys.job(bad), "spec", json.dumps(spec))
    ctx = _context(ledger, FileStorage(tmp_path), tiny_model)
    # When a worker processes the chunk
    outcome = process_chunk(ctx, job_ids, "tiny")
    # Then the bad job failed at once with the reason, and its neighbours succeeded
    record = ledger.job(bad)
    assert record["state"] == "failed" and record["reason"] == "invalid_input"
    assert "more pixels than 4096x4096" in record["error"] and record["attempts"] == 0
    assert sorted(outcome.succeeded) == sorted([job_ids[0], job_ids[2]])
    assert outcome.failed == [bad]


def test_an_s3_init_image_too_big_to_decode_fails_its_job_alone_with_the_reason(
    client: redis.Redis,
    s3_service: S3Service,
    tiny_model: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a chunk whose first job's s3:// init image is a 69-byte PNG claiming 20000x20000
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_service.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_service.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_service.region)
    storage = S3Storage(
        s3_service.bucket, f"runtime-{secrets.token_hex(4)}", endpoint_url=s3_service.endpoint_url
    )
    storage.put("uploads/bomb.png", _png_header(20000, 20000), "image/png")
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    specs = [
        JobSpec.model_validate(
            {
                **SPEC,
                "prompt": "a fox",
                "seed": 1,
                "init_image": storage.describe("uploads/bomb.png"),
            }
        ),
        JobSpec.model_validate(
            {
                **SPEC,
                "prompt": "a fox",
                "seed": 2,
                "init_image": storage.describe("uploads/bomb.png"),
            }
        ),
    ]
    bomb = ledger.create_batch(new_batch_id(), specs[:1])[0]
    good = _submit(ledger, 1)[0]
    ctx = _context(ledger, storage, tiny_model)
    # When one worker gets both in a chunk (they cannot share a pass: only the bomb is img2img)
    outcome = process_chunk(ctx, [bomb], "tiny")
    neighbour = process_chunk(ctx, [good], "tiny")
    # Then the bomb's job failed at its first attempt with a reason, not as a lost worker
    record = ledger.job(bomb)
    assert record["state"] == "failed" and record["reason"] == "invalid_input", record
    assert "init image" in record["error"] and record["attempts"] == 1
    assert outcome.failed == [bomb] and neighbour.succeeded == [good]


def test_a_store_that_refuses_fails_its_jobs_at_once_with_the_stores_reason(
    client: redis.Redis, tmp_path: Path, tiny_model: LoadedModel
) -> None:
    # Given a store that answers and refuses (wrong credentials), with many tries allowed
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    job_ids = _submit(ledger, 2)
    store = FailingStore(tmp_path, StorageRefused("InvalidAccessKeyId: no such key"))
    ctx = _context(ledger, store, tiny_model, storage_put_attempts=5, storage_backoff_s=5.0)
    # When the worker renders the chunk
    started = time.monotonic()
    outcome = process_chunk(ctx, job_ids, "tiny")
    # Then both jobs failed at once (no retry pauses, no hand-back), saying what the store said
    assert time.monotonic() - started < 5.0
    assert sorted(outcome.failed) == sorted(job_ids)
    for record in ledger.jobs(job_ids):
        assert record is not None and record["state"] == "failed"
        assert record["reason"] == "storage" and "InvalidAccessKeyId" in record["error"]
        assert record["attempts"] == 1
    # And the failure is counted under its code for /metrics
    assert int(client.hget(ledger.keys.stats("failures"), "storage") or 0) >= 2
