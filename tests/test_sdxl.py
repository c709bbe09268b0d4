"""SDXL base in the one sampling loop: every sampler renders diffusers' pixels on the tiny SDXL.

The reference is `StableDiffusionXLPipeline` built from the same tiny model folder
(`make-tiny --arch sdxl`), with each sampler's scheduler configured as `tests/test_samplers.py`
configures it, the same prompt, negative prompt, seed, guidance, steps and size. An empty negative
prompt is compared with diffusers given none (`force_zeros_for_empty_prompt`). Then 8 mixed SDXL
jobs render the same together as one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from diffusers import (
    LMSDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from shared.config import Settings
from shared.ids import new_batch_id
from shared.jobs import JobSpec
from shared.ledger import Ledger
from shared.metadata import read_png_metadata
from shared.storage import FileStorage
from tests.reporting import difference_report
from tests.test_img2img import diffusers_image, init_picture, png_base64
from tests.test_samplers import (
    MIXED,
    PIXEL_TOLERANCE,
    REFERENCE,
    ROW,
    STEPS,
    difference,
    together_and_alone,
)
from tests.test_samplers import diffusers_image as txt2img_image
from worker.chunk import process_chunk
from worker.context import WorkerContext
from worker.models import LoadedModel, load_model
from worker.rows import pass_params, row_for
from worker.sampler import PassParams, Row, render_pass
from worker.tiny import make_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-sdxl", arch="sdxl")


@pytest.fixture(scope="module")
def sdxl(sdxl_dir: Path) -> LoadedModel:
    return load_model("tiny-sdxl", str(sdxl_dir))


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


report = difference_report(f"SDXL: max pixel difference vs diffusers (tolerance {PIXEL_TOLERANCE})")


def sdxl_image(pipe: StableDiffusionXLPipeline, name: str, row: Row) -> np.ndarray:
    """An empty negative prompt goes in as none, so the model's `force_zeros_for_empty_prompt`
    applies as it does in diffusers."""
    text = {"prompt": row.prompt, "negative_prompt": row.negative_prompt or None}
    return txt2img_image(pipe, name, row, **text)


def test_the_tiny_sdxl_is_read_as_sdxl(sdxl: LoadedModel) -> None:
    assert sdxl.family == "sdxl"
    assert sdxl.text_encoder_2 is not None and sdxl.tokenizer_2 is not None
    assert sdxl.force_zeros_for_empty_prompt
    assert sdxl.scaling_factor == pytest.approx(0.13025)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_each_sampler_renders_the_pixels_diffusers_sdxl_renders(
    sdxl: LoadedModel, sdxl_pipe: StableDiffusionXLPipeline, name: str, report: Callable[..., None]
) -> None:
    # Given one row with a negative prompt, When sdfarm and diffusers render it on the tiny SDXL
    ours = render_pass(sdxl, [ROW], PassParams(STEPS, 64, 64, name)).images[0]
    theirs = sdxl_image(sdxl_pipe, name, ROW)
    # Then the pixels agree within the tolerance, and the image is not flat
    diff = difference(ours, theirs)
    report(f"{name} txt2img", diff)
    assert diff <= PIXEL_TOLERANCE
    assert ours is not None and ours.std() > 5


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_an_empty_negative_prompt_renders_as_diffusers_given_none(
    sdxl: LoadedModel, sdxl_pipe: StableDiffusionXLPipeline, name: str, report: Callable[..., None]
) -> None:
    # Given a row without a negative prompt, on a model that zeroes an empty one
    row = Row(ROW.prompt, "", ROW.seed, ROW.guidance)
    # When both render it
    ours = render_pass(sdxl, [row], PassParams(STEPS, 64, 64, name)).images[0]
    theirs = sdxl_image(sdxl_pipe, name, row)
    # Then the pixels agree, and differ from the image with an encoded "" negative
    diff = difference(ours, theirs)
    report(f"{name} empty negative", diff)
    assert diff <= PIXEL_TOLERANCE
    encoded = render_pass(
        replace(sdxl, force_zeros_for_empty_prompt=False), [row], PassParams(STEPS, 64, 64, name)
    ).images[0]
    assert difference(ours, encoded) > PIXEL_TOLERANCE


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_sde"])
def test_eight_mixed_sdxl_jobs_render_the_same_together_as_one_by_one(
    sdxl: LoadedModel, name: str, report: Callable[..., None]
) -> None:
    # Given 8 SDXL jobs with different prompts, negatives (some empty), guidance and seeds
    params = PassParams(STEPS, 64, 64, name)
    # When they render in one pass, and each alone
    together, alone = together_and_alone(sdxl, MIXED, params)
    # Then every job's image is the same either way
    diff = max(difference(a, b) for a, b in zip(together, alone, strict=True))
    report(f"{name} batch of 8 vs alone", diff)
    assert diff <= PIXEL_TOLERANCE
    # And two jobs with the same prompt but other seeds differ (the noise is per row)
    assert difference(together[0], together[4]) > 10 * PIXEL_TOLERANCE


def test_an_sdxl_chunk_goes_through_the_farm_path_and_its_png_says_what_it_rendered(
    sdxl: LoadedModel, redis_url: str, tmp_path: Path
) -> None:
    # Given a worker holding the tiny SDXL and two queued SDXL jobs
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    settings = Settings(redis_url=redis_url, models={"xl": sdxl.path})
    storage = FileStorage(tmp_path)
    ctx = WorkerContext(
        settings=settings, ledger=ledger, storage=storage, models={"xl": sdxl}, worker_id="w-xl"
    )
    base = {"model": "xl", "width": 64, "height": 64, "steps": 3, "scheduler": "euler"}
    specs = [
        JobSpec.model_validate({**base, "prompt": f"a fox {i}", "seed": i, "guidance": 5.0})
        for i in range(2)
    ]
    job_ids = ledger.create_batch(new_batch_id(), specs)
    # When the chunk is processed
    outcome = process_chunk(ctx, job_ids, "xl")
    # Then both succeeded, and each PNG's parameters name the job's seed and sampler
    assert sorted(outcome.succeeded) == sorted(job_ids)
    for i, job_id in enumerate(job_ids):
        record = ledger.job(job_id)
        parameters = read_png_metadata(storage.get(record["result"]["key"]))["parameters"]
        assert f"Seed: {i}" in parameters and "Sampler: Euler" in parameters
        assert record["model_family"] == "sdxl"
    client.close()


@pytest.mark.parametrize(
    ("name", "strength"),
    [
        ("lms", 0.6),
        ("euler_a", 0.75),
        ("dpmpp_2m_karras", 1.0),
        # and every other sampler
        ("euler", 0.75),
        ("heun", 0.5),
        ("ddim", 0.75),
        ("pndm", 0.75),
        ("dpmpp_2m", 0.6),
        ("unipc", 0.75),
        ("dpmpp_sde", 0.6),
    ],
)
def test_sdxl_img2img_renders_the_pixels_the_diffusers_sdxl_img2img_pipeline_renders(
    sdxl: LoadedModel, sdxl_dir: Path, name: str, strength: float, report: Callable[..., None]
) -> None:
    # Given an SDXL job with an init image and a strength
    spec = JobSpec(
        prompt="a watercolor of a red ball",
        negative_prompt="blurry",
        scheduler=name,
        steps=STEPS,
        width=64,
        height=64,
        seed=31337,
        init_image=png_base64(init_picture()),
        strength=strength,
    )
    # When sdfarm renders it, and diffusers' SDXL img2img pipeline on the same folder
    ours = render_pass(sdxl, [row_for(spec)], pass_params(spec)).images[0]
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    row = Row(spec.prompt, spec.negative_prompt, 31337, spec.guidance)
    theirs = diffusers_image(pipe, name, row, strength)
    # Then the pixels agree within the tolerance
    diff = difference(ours, theirs)
    report(f"{name} img2img strength {strength}", diff)
    assert diff <= PIXEL_TOLERANCE


def test_size_conditioning_renders_as_diffusers_and_rows_with_other_sizes_share_a_pass(
    sdxl: LoadedModel, sdxl_pipe: StableDiffusionXLPipeline, report: Callable[..., None]
) -> None:
    # Given rows that ask for other original sizes and crops (SDXL's size conditioning)
    conditioned = [
        replace(ROW, original_size=(1024, 768), crop_top_left=(16, 32)),
        replace(ROW, seed=99, original_size=(256, 512)),
        replace(ROW, seed=5, crop_top_left=(64, 0)),
    ]
    params = PassParams(STEPS, 64, 64, "euler")
    # When sdfarm renders them together, and diffusers renders the first with the same numbers
    together = render_pass(sdxl, conditioned, params).images
    alone = [render_pass(sdxl, [row], params).images[0] for row in conditioned]
    config = LMSDiscreteScheduler.load_config(Path(sdxl_pipe.name_or_path) / "scheduler")
    sdxl_pipe.scheduler = REFERENCE["euler"][0].from_config(config)
    theirs = sdxl_pipe(
        prompt=ROW.prompt,
        negative_prompt=ROW.negative_prompt,
        num_inference_steps=STEPS,
        guidance_scale=ROW.guidance,
        height=64,
        width=64,
        original_size=(1024, 768),
        crops_coords_top_left=(16, 32),
        generator=[torch.Generator().manual_seed(ROW.seed)],
        output_type="np",
    ).images[0]
    # Then the first matches diffusers, each row renders the same batched or alone, and the
    # conditioning changed the image
    diff = difference(together[0], (theirs * 255).round().astype(np.uint8))
    report("euler original size + crop", diff)
    assert diff <= PIXEL_TOLERANCE
    assert max(difference(a, b) for a, b in zip(together, alone, strict=True)) <= PIXEL_TOLERANCE
    plain = render_pass(sdxl, [ROW], params).images[0]
    assert difference(together[0], plain) > PIXEL_TOLERANCE


def test_size_conditioning_on_an_sd1_model_is_ignored_with_a_warning(tiny_model_dir: Path) -> None:
    model = load_model("tiny", str(tiny_model_dir))
    row = replace(ROW, original_size=(1024, 1024))
    result = render_pass(model, [row], PassParams(2, 64, 64, "euler"))
    assert any("SDXL conditioning" in w for w in result.warnings[0])


def test_a_job_carries_its_size_conditioning_to_its_row() -> None:
    spec = JobSpec(
        prompt="x", width=64, height=64, original_width=2048, crop_top=8, crop_left=16, seed=1
    )
    row = row_for(spec)
    assert row.original_size == (64, 2048) and row.crop_top_left == (8, 16)
    assert row_for(JobSpec(prompt="x", seed=1)).original_size is None
