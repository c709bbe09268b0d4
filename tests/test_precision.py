"""The precision guard: a NaN or black decode is decoded again in float32, or the job fails.

No GPU here, so the float16 failure is made real on the CPU: the VAE runs in float16 with its
decoder's first convolution scaled by 1e5, so its activations overflow float16 (to inf, then NaN
through GroupNorm) exactly as SD's VAE can on a GPU, while in float32 the GroupNorm that follows
absorbs the scale. A VAE whose weights are NaN fails in any precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from shared.config import Settings
from shared.ids import new_batch_id
from shared.jobs import JobSpec, JobState
from shared.ledger import Ledger
from shared.metadata import read_png_metadata
from shared.storage import open_storage
from worker.chunk import WorkerContext, process_chunk
from worker.models import LoadedModel, load_model
from worker.sampler import PassParams, Row, render_pass

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = PassParams(4, 64, 64, "euler")
ROW = Row("a lighthouse at night", "blurry", 11, 7.5)


def overflowing_fp16_vae(model: LoadedModel) -> LoadedModel:
    conv = model.vae.decoder.conv_in
    with torch.no_grad():
        conv.weight.mul_(1e5)
        conv.bias.mul_(1e5)
    torch.nn.Module.to(model.vae, torch.float16)
    return model


def nan_vae(model: LoadedModel) -> LoadedModel:
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.fill_(float("nan"))
    return model


@pytest.fixture
def fresh_model(tiny_model_dir: Path) -> LoadedModel:
    """A model of its own: these tests poison its VAE."""
    return load_model("tiny", str(tiny_model_dir))


def test_a_nan_float16_decode_is_decoded_again_in_float32_and_says_so(
    fresh_model: LoadedModel,
) -> None:
    # Given a model whose float16 VAE decode overflows to NaN
    model = overflowing_fp16_vae(fresh_model)
    # When a row is rendered
    result = render_pass(model, [ROW], PARAMS)
    # Then it has a real image, decoded in float32, and a warning that says so
    image = result.images[0]
    assert image is not None and image.std() > 5 and image.max() > 0
    assert result.errors == [None]
    assert result.warnings == [["vae decoded in fp32: the float16 decode gave NaN"]]
    # And the VAE is back in float16 for the next pass
    assert model.vae.dtype == torch.float16


def test_a_decode_that_stays_nan_in_float32_fails_the_row_with_a_reason(
    fresh_model: LoadedModel,
) -> None:
    # Given a model whose VAE gives NaN whatever the precision, and a healthy batch-mate's row
    model = nan_vae(fresh_model)
    # When two rows render
    result = render_pass(model, [ROW, Row("a dog", "", 12, 7.5)], PARAMS)
    # Then neither gets a (black) image; each gets a readable reason instead
    assert result.images == [None, None]
    for error in result.errors:
        assert error is not None
        assert "the VAE decode gave NaN even in float32" in error
        assert "the VAE itself fails" in error


@pytest.fixture
def worker_ctx(redis_url: str, tmp_path: Path, fresh_model: LoadedModel) -> Iterator[WorkerContext]:
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path / 'images'}",
        models={"tiny": "in-process"},
        max_attempts=1,
    )
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    yield WorkerContext(
        settings=settings,
        ledger=ledger,
        storage=open_storage(settings.storage_url),
        models={"tiny": fresh_model},
        worker_id="in-process",
    )
    client.close()


def _submit(ctx: WorkerContext, count: int) -> list[str]:
    base = {"model": "tiny", "width": 64, "height": 64, "steps": 4, "scheduler": "euler"}
    specs = [
        JobSpec.model_validate({**base, "prompt": f"a lighthouse {i}", "seed": i})
        for i in range(count)
    ]
    return ctx.ledger.create_batch(new_batch_id(), specs)


def test_a_job_whose_decode_needed_float32_records_it_in_its_record_and_png(
    worker_ctx: WorkerContext,
) -> None:
    # Given a worker whose float16 VAE overflows, and a queued job
    overflowing_fp16_vae(worker_ctx.models["tiny"])
    (job_id,) = _submit(worker_ctx, 1)
    # When the worker renders it
    outcome = process_chunk(worker_ctx, [job_id], "tiny")
    # Then it succeeded, its record and its PNG say the VAE decoded in float32
    assert outcome.succeeded == [job_id]
    record = worker_ctx.ledger.job(job_id)
    assert record["state"] == JobState.SUCCEEDED.value
    assert record["warnings"] == ["vae decoded in fp32: the float16 decode gave NaN"]
    png = worker_ctx.storage.get(record["result"]["key"])
    assert "vae decoded in fp32" in read_png_metadata(png)["sdfarm"]


def test_a_job_whose_decode_stays_nan_fails_with_the_reason_and_stores_nothing(
    worker_ctx: WorkerContext, tmp_path: Path
) -> None:
    # Given a worker whose VAE gives NaN in any precision, and two queued jobs
    nan_vae(worker_ctx.models["tiny"])
    job_ids = _submit(worker_ctx, 2)
    # When the worker renders them
    outcome = process_chunk(worker_ctx, job_ids, "tiny")
    # Then both failed with a reason a person can act on, and no image was stored
    assert sorted(outcome.failed) == sorted(job_ids)
    for record in worker_ctx.ledger.jobs(job_ids):
        assert record is not None and record["state"] == JobState.FAILED.value
        assert "the VAE decode gave NaN even in float32" in record["error"]
    assert not list((tmp_path / "images").rglob("*.png"))
