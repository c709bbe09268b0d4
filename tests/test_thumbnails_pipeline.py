"""Thumbnails in a worker's chunk path: made and stored on the output thread, never on the
sampling path, beside each image; `SDFARM_THUMBNAIL_PX=0` makes none."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

import worker.upload
from producer.services import S3Service
from shared.config import Settings
from shared.ids import new_batch_id
from shared.jobs import JobSpec, JobState
from shared.ledger import Ledger
from shared.storage import S3Storage
from worker.chunk import WorkerContext, process_chunk
from worker.models import LoadedModel, load_model
from worker.output import OutputPipeline


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


@pytest.fixture
def s3(s3_service: S3Service, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_service.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_service.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_service.region)
    prefix = f"thumbs-{int(time.time() * 1000)}"
    return S3Storage(s3_service.bucket, prefix, endpoint_url=s3_service.endpoint_url)


@pytest.fixture
def ledger(redis_url: str) -> Iterator[Ledger]:
    client = redis.Redis.from_url(redis_url)
    yield Ledger(client, status_ttl_s=3600, lease_s=30)
    client.close()


def _context(
    ledger: Ledger, s3: S3Storage, model: LoadedModel, output: OutputPipeline | None, px: int
) -> WorkerContext:
    settings = Settings(
        redis_url="redis://unused", models={"tiny": model.path}, lease_s=30, thumbnail_px=px
    )
    return WorkerContext(
        settings=settings,
        ledger=ledger,
        storage=s3,
        models={"tiny": model},
        worker_id="test-worker",
        output=output,
    )


def _submit(ledger: Ledger, **fields: object) -> list[str]:
    specs = [
        JobSpec.model_validate(
            {"prompt": f"a heron {i}", "model": "tiny", "width": 128, "height": 64, "steps": 2}
            | {"seed": i, **fields}
        )
        for i in range(2)
    ]
    return ledger.create_batch(new_batch_id(), specs)


def test_thumbnails_are_made_on_the_output_thread_and_stored_beside_the_images(
    ledger: Ledger, s3: S3Storage, tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker with an output pipeline, whose thumbnails are 32 px, and a chunk of JPEGs
    made_on: list[str] = []
    real = worker.upload.thumbnail_webp

    def watched(pixels: Image.Image, longest_px: int) -> bytes:
        made_on.append(threading.current_thread().name)
        return real(pixels, longest_px)

    monkeypatch.setattr(worker.upload, "thumbnail_webp", watched)
    output = OutputPipeline(depth=1, name="output")
    job_ids = _submit(ledger, output_format="jpeg")
    # When the chunk is processed on this thread (the sampling path) and the pipeline closed
    process_chunk(_context(ledger, s3, tiny_model, output, 32), job_ids, "tiny")
    output.close()
    # Then each thumbnail was made on the output thread, not on the sampling path
    assert made_on == ["output", "output"]
    assert threading.current_thread().name not in made_on
    thumbs, images = [], []
    for job_id in job_ids:
        record = ledger.job(job_id)
        assert record.state is JobState.SUCCEEDED
        result = record.result or {}
        # And it lies beside the image, a WebP 32 px on its longest side
        thumb_key = result["thumbnail_key"]
        assert thumb_key == result["key"].rsplit("/", 1)[0] + f"/thumbs/{job_id}.webp"
        with Image.open(io.BytesIO(s3.get(thumb_key))) as thumb:
            assert (thumb.format, thumb.size) == ("WEBP", (32, 16))
            thumbs.append(np.asarray(thumb.convert("RGB"), dtype=np.float32))
        with Image.open(io.BytesIO(s3.get(result["key"]))) as image:
            assert image.format == "JPEG"
            small = image.convert("RGB").resize((32, 16), Image.Resampling.BOX)
            images.append(np.asarray(small, dtype=np.float32))
    # And each thumbnail is its own job's picture: nearer to it than to the other job's
    for mine, other in ((0, 1), (1, 0)):
        own = np.abs(thumbs[mine] - images[mine]).mean()
        assert own < np.abs(thumbs[mine] - images[other]).mean()


def test_no_thumbnails_when_the_setting_is_zero(
    ledger: Ledger, s3: S3Storage, tiny_model: LoadedModel
) -> None:
    job_ids = _submit(ledger)
    process_chunk(_context(ledger, s3, tiny_model, None, 0), job_ids, "tiny")
    for job_id in job_ids:
        record = ledger.job(job_id)
        assert record.state is JobState.SUCCEEDED
        assert "thumbnail_key" not in (record.result or {})
        assert not s3.exists(f"{s3.prefix}/{record.batch_id}/thumbs/{job_id}.webp")
