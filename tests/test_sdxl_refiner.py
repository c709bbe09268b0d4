"""SDXL base + refiner in the one sampling loop, against diffusers' two-pipeline ensemble.

The reference is what diffusers documents for the ensemble: `StableDiffusionXLPipeline` on the
tiny base with `denoising_end=switch` and `output_type="latent"`, then
`StableDiffusionXLImg2ImgPipeline` on the tiny refiner with `denoising_start=switch` and those
latents, the same generator carried through both calls (so a stochastic sampler's noise goes on
from where the base left it), each sampler's scheduler configured as tests/test_samplers.py does.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import redis
import torch
from diffusers import (
    LMSDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from producer.submit import validate_jobs
from shared.config import Settings
from shared.errors import InvalidJob
from shared.ids import new_batch_id
from shared.jobs import JobSpec
from shared.ledger import Ledger
from shared.metadata import read_png_metadata
from shared.routing import compat_key, route_of
from shared.storage import FileStorage
from tests.reporting import difference_report
from tests.test_img2img import init_picture, png_base64
from tests.test_samplers import (
    MIXED,
    PIXEL_TOLERANCE,
    REFERENCE,
    ROW,
    STEPS,
    difference,
    together_and_alone,
)
from worker.chunk import process_chunk
from worker.cli import main as worker_cli
from worker.context import WorkerContext
from worker.main import routes
from worker.models import LoadedModel, load_model
from worker.rows import pass_params, row_for
from worker.sampler import PassParams, Row, render_pass

SWITCH = 0.8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir: Path) -> LoadedModel:
    return load_model("xl", str(tiny_sdxl_dir))


@pytest.fixture(scope="module")
def refiner(tiny_refiner_dir: Path) -> LoadedModel:
    return load_model("ref", str(tiny_refiner_dir))


@pytest.fixture(scope="module")
def pipes(tiny_sdxl_dir: Path, tiny_refiner_dir: Path) -> Iterator[dict[str, Any]]:
    made = {
        "base": StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir),
        "base_img2img": StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_dir),
        "refiner": StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_refiner_dir),
    }
    for pipe in made.values():
        pipe.set_progress_bar_config(disable=True)
    yield made


report = difference_report(
    f"SDXL refiner: max pixel difference vs diffusers (tolerance {PIXEL_TOLERANCE})"
)


def _schedule(pipe: Any, name: str, seed: int) -> None:
    cls, settings, _ = REFERENCE[name]
    if "noise_sampler_seed" in settings:  # DPM++ SDE's Brownian tree: the row's seed
        settings = {**settings, "noise_sampler_seed": seed}
    config = LMSDiscreteScheduler.load_config(Path(pipe.name_or_path) / "scheduler")
    pipe.scheduler = cls.from_config(config, **settings)


def ensemble(
    pipes: dict[str, Any],
    name: str,
    row: Row,
    *,
    init: Image.Image | None = None,
    strength: float = 1.0,
    switch: float = SWITCH,
    **refiner_kwargs: Any,
) -> np.ndarray:
    """diffusers' base + refiner ensemble for one row, as 8-bit pixels."""
    generator = [torch.Generator().manual_seed(row.seed)]
    common = {
        "prompt": row.prompt,
        "negative_prompt": row.negative_prompt,
        "num_inference_steps": STEPS,
        "guidance_scale": row.guidance,
        "generator": generator,
    }
    base = pipes["base" if init is None else "base_img2img"]
    for pipe in (base, pipes["refiner"]):
        _schedule(pipe, name, row.seed)
    sized = {"height": 64, "width": 64} if init is None else {"image": init, "strength": strength}
    with warnings.catch_warnings():
        # torchsde warns when diffusers' DPM++ SDE asks an ulp outside its Brownian tree.
        warnings.filterwarnings("ignore", "Should have t", UserWarning)
        latents = base(
            **common, **sized, denoising_end=switch, output_type="latent"
        ).images  # fmt: skip
        image = pipes["refiner"](
            **common, image=latents, denoising_start=switch, output_type="np", **refiner_kwargs
        ).images[0]
    pixels: np.ndarray = (image * 255).round().astype(np.uint8)
    return pixels


def test_the_tiny_refiner_is_read_as_an_sdxl_refiner(refiner: LoadedModel) -> None:
    assert refiner.family == "sdxl-refiner"
    assert refiner.text_encoder is None and refiner.text_encoder_2 is not None
    assert refiner.requires_aesthetics_score and not refiner.force_zeros_for_empty_prompt
    assert refiner.tokenizer is refiner.tokenizer_2


@pytest.mark.parametrize("name", list(REFERENCE))
def test_base_and_refiner_render_the_pixels_of_the_diffusers_ensemble(
    sdxl: LoadedModel,
    refiner: LoadedModel,
    pipes: dict[str, Any],
    name: str,
    report: Callable[[str, int], None],
) -> None:
    # Given one row, and a refiner taking over at 0.8
    params = PassParams(STEPS, 64, 64, name, refiner_switch_at=SWITCH)
    # When sdfarm renders it with both models, and diffusers' two pipelines do
    ours = render_pass(sdxl, [ROW], params, refiner=refiner).images[0]
    theirs = ensemble(pipes, name, ROW)
    # Then the pixels agree within the tolerance, and the refiner changed the image
    diff = difference(ours, theirs)
    report(f"{name} base + refiner", diff)
    assert diff <= PIXEL_TOLERANCE
    alone = render_pass(sdxl, [ROW], PassParams(STEPS, 64, 64, name)).images[0]
    assert difference(ours, alone) > 10 * PIXEL_TOLERANCE


@pytest.mark.parametrize(("name", "strength"), [("euler_a", 0.75), ("dpmpp_2m", 0.6)])
def test_img2img_with_a_refiner_renders_the_pixels_of_the_diffusers_ensemble(
    sdxl: LoadedModel,
    refiner: LoadedModel,
    pipes: dict[str, Any],
    name: str,
    *,
    strength: float,
    report: Callable[[str, int], None],
) -> None:
    # Given an img2img job with a refiner
    spec = JobSpec(
        prompt=ROW.prompt,
        negative_prompt=ROW.negative_prompt,
        scheduler=name,
        steps=STEPS,
        width=64,
        height=64,
        seed=ROW.seed,
        init_image=png_base64(init_picture()),
        strength=strength,
        refiner="ref",
        refiner_switch_at=SWITCH,
        model="xl",
    )
    # When sdfarm renders it, and diffusers' SDXL img2img pipeline hands over to the refiner
    ours = render_pass(sdxl, [row_for(spec)], pass_params(spec), refiner=refiner).images[0]
    row = replace(ROW, guidance=spec.guidance)
    theirs = ensemble(pipes, name, row, init=init_picture(), strength=strength)
    # Then the pixels agree within the tolerance
    diff = difference(ours, theirs)
    report(f"{name} img2img strength {strength} + refiner", diff)
    assert diff <= PIXEL_TOLERANCE


def test_the_aesthetic_scores_condition_the_refiner_as_diffusers_does(
    sdxl: LoadedModel,
    refiner: LoadedModel,
    pipes: dict[str, Any],
    report: Callable[[str, int], None],
) -> None:
    # Given a row asking for other aesthetic scores than the defaults (6 and 2.5), and a refiner
    # that does most of the work (an early switch)
    row = replace(ROW, aesthetic_score=10.0, negative_aesthetic_score=0.0)
    params = PassParams(STEPS, 64, 64, "euler", refiner_switch_at=0.3)
    # When both render it
    ours = render_pass(sdxl, [row], params, refiner=refiner).images[0]
    theirs = ensemble(
        pipes, "euler", row, switch=0.3, aesthetic_score=10.0, negative_aesthetic_score=0.0
    )
    # Then they agree, and the scores changed the image
    diff = difference(ours, theirs)
    report("euler aesthetic 10 / 0, switch at 0.3", diff)
    assert diff <= PIXEL_TOLERANCE
    default = render_pass(sdxl, [ROW], params, refiner=refiner).images[0]
    assert difference(ours, default) > PIXEL_TOLERANCE


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_sde"])
def test_eight_mixed_refined_jobs_render_the_same_together_as_one_by_one(
    sdxl: LoadedModel, refiner: LoadedModel, name: str, report: Callable[[str, int], None]
) -> None:
    # Given 8 SDXL jobs with a refiner: prompts, negatives, guidance, seeds, sizes, scores differ
    rows = [
        replace(row, original_size=(1024, 1024) if i % 2 else None, aesthetic_score=5.0 + i / 2)
        for i, row in enumerate(MIXED)
    ]
    params = PassParams(STEPS, 64, 64, name, refiner_switch_at=SWITCH)
    # When they render in one pass, and each alone
    together, alone = together_and_alone(sdxl, rows, params, refiner)
    # Then every job's image is the same either way
    diff = max(difference(a, b) for a, b in zip(together, alone, strict=True))
    report(f"{name} refined batch of 8 vs alone", diff)
    assert diff <= PIXEL_TOLERANCE


def test_progress_counts_the_steps_of_both_models(sdxl: LoadedModel, refiner: LoadedModel) -> None:
    # Given a refined pass of 8 Euler steps, switching at 0.8
    seen: list[tuple[int, int]] = []
    params = PassParams(STEPS, 64, 64, "euler", refiner_switch_at=SWITCH)
    # When it renders
    render_pass(
        sdxl, [ROW], params, lambda done, total: seen.append((done, total)), refiner=refiner
    )
    # Then every U-Net step of the base and the refiner was reported, out of their sum
    assert seen == [(i, STEPS) for i in range(1, STEPS + 1)]


def test_a_refiner_cannot_start_an_image_nor_a_base_finish_one(
    sdxl: LoadedModel, refiner: LoadedModel, tiny_model_dir: Path
) -> None:
    params = PassParams(2, 64, 64, "euler", refiner_switch_at=SWITCH)
    with pytest.raises(InvalidJob, match="cannot start"):
        render_pass(refiner, [ROW], params, refiner=refiner)
    with pytest.raises(InvalidJob, match="not an sdxl-refiner"):
        render_pass(sdxl, [ROW], params, refiner=sdxl)
    sd1 = load_model("tiny", str(tiny_model_dir))
    with pytest.raises(InvalidJob, match="cannot start"):
        render_pass(sd1, [ROW], params, refiner=refiner)


# The job spec, the submit checks and the route.


def test_a_refined_job_has_its_own_compat_key_and_route() -> None:
    plain = JobSpec(prompt="x", model="xl", seed=1)
    refined = JobSpec(prompt="x", model="xl", refiner="ref", seed=1)
    later = JobSpec(prompt="x", model="xl", refiner="ref", refiner_switch_at=0.9, seed=1)
    assert route_of(plain) == "xl" and route_of(refined) == "xl+ref"
    assert len({compat_key(plain), compat_key(refined), compat_key(later)}) == 3
    assert refined.switch_at == SWITCH and pass_params(refined).refiner_switch_at == SWITCH
    # aesthetic scores are per row: jobs differing only there share a pass
    scored = JobSpec(prompt="x", model="xl", refiner="ref", aesthetic_score=9.0, seed=1)
    assert compat_key(scored) == compat_key(refined)
    assert row_for(scored).aesthetic_score == 9.0 and row_for(refined).aesthetic_score == 6.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"refiner_switch_at": 0.5}, "applies only to jobs with a refiner"),
        ({"aesthetic_score": 7.0}, "applies only to jobs with a refiner"),
        ({"refiner": "ref", "refiner_switch_at": 1.0}, "less than 1"),
        ({"refiner": "ref", "refiner_switch_at": 0.0}, "greater than 0"),
        ({"refiner": "xl"}, "names the job's own model"),
        ({"refiner": "a+b"}, "must be a model name"),
    ],
)
def test_refiner_fields_are_checked_with_a_clear_message(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        JobSpec.model_validate({"prompt": "x", "model": "xl", **fields})


def test_img2img_with_a_refiner_must_start_above_the_switch_point() -> None:
    init = png_base64(init_picture())
    fields: dict[str, Any] = {"prompt": "x", "model": "xl", "refiner": "ref", "init_image": init}
    fields |= {"width": 64, "height": 64}
    with pytest.raises(pydantic.ValidationError, match="strength must be above 1 - "):
        JobSpec.model_validate({**fields, "strength": 0.15})
    assert JobSpec.model_validate({**fields, "strength": 0.3}).denoising_strength == 0.3


def test_submit_refuses_refiners_the_farm_does_not_have_or_that_do_not_fit() -> None:
    settings = Settings(models={"xl": "/m/xl", "ref": "/m/ref", "sd": "/m/sd"})
    families = {"xl": "sdxl", "ref": "sdxl-refiner", "sd": "sd1"}
    cases = [
        ({"model": "xl", "refiner": "nope"}, "unknown model 'nope'"),
        ({"model": "sd", "refiner": "ref"}, "'sd' is sd1"),
        ({"model": "xl", "refiner": "sd"}, "'sd' is sd1"),
        ({"model": "ref"}, "is an SDXL refiner"),
    ]
    for job, message in cases:
        with pytest.raises(InvalidJob, match=re.escape(message)):
            validate_jobs([{"prompt": "x", **job}], settings, {}, families)
    [spec] = validate_jobs(
        [{"prompt": "x", "model": "xl", "refiner": "ref"}], settings, {}, families
    )
    assert route_of(spec) == "xl+ref"


# The worker: what it serves, and a refined chunk through the farm path.


def test_a_worker_serves_each_base_with_each_refiner_it_holds(
    sdxl: LoadedModel, refiner: LoadedModel, tiny_model_dir: Path
) -> None:
    sd1 = load_model("tiny", str(tiny_model_dir))
    assert routes({"xl": sdxl, "ref": refiner, "tiny": sd1}) == ["ref", "tiny", "xl", "xl+ref"]
    assert routes({"xl": sdxl, "tiny": sd1}) == ["tiny", "xl"]


def test_a_refined_chunk_goes_through_the_farm_path_and_its_png_names_the_refiner(
    sdxl: LoadedModel, refiner: LoadedModel, redis_url: str, tmp_path: Path
) -> None:
    # Given a worker holding the base and the refiner, and two queued refined jobs
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    settings = Settings(redis_url=redis_url, models={"xl": sdxl.path, "ref": refiner.path})
    storage = FileStorage(tmp_path)
    ctx = WorkerContext(
        settings=settings,
        ledger=ledger,
        storage=storage,
        models={"xl": sdxl, "ref": refiner},
        worker_id="w-ref",
    )
    base = {"model": "xl", "refiner": "ref", "width": 64, "height": 64, "steps": 4}
    specs = [
        JobSpec.model_validate({**base, "prompt": f"a fox {i}", "seed": i, "scheduler": "euler"})
        for i in range(2)
    ]
    job_ids = ledger.create_batch(new_batch_id(), specs)
    # When the chunk for the route is processed (and a chunk sent to the base's route by mistake)
    assert process_chunk(ctx, job_ids, "xl").skipped == job_ids
    outcome = process_chunk(ctx, job_ids, "xl+ref")
    # Then both succeeded, and each PNG's parameters name the refiner as A1111 writes it
    assert sorted(outcome.succeeded) == sorted(job_ids)
    for job_id in job_ids:
        record = ledger.job(job_id)
        assert record is not None and record["refiner_hash"] == refiner.model_hash
        parameters = read_png_metadata(storage.get(record["result"]["key"]))["parameters"]
        settings_line = parameters.split("\n")[-1]
        assert f"Refiner: ref [{refiner.model_hash}], Refiner switch at: 0.8" in settings_line
        assert "Model: xl" in settings_line
    client.close()


def test_a_refined_chunk_on_models_of_the_wrong_family_fails_as_invalid_input(
    sdxl: LoadedModel, tiny_model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    # Given a worker whose `ref` is in fact an SD 1.x model (the API could not read its folder)
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    wrong = load_model("ref", str(tiny_model_dir))
    ctx = WorkerContext(
        settings=Settings(redis_url=redis_url),
        ledger=ledger,
        storage=FileStorage(tmp_path),
        models={"xl": sdxl, "ref": wrong},
        worker_id="w-wrong",
    )
    spec = JobSpec(prompt="x", model="xl", refiner="ref", width=64, height=64, seed=1)
    job_ids = ledger.create_batch(new_batch_id(), [spec])
    # When its chunk is processed
    outcome = process_chunk(ctx, job_ids, "xl+ref")
    # Then the job failed at once, saying why, and nothing rendered
    assert outcome.failed == job_ids
    record = ledger.job(job_ids[0])
    assert record is not None and record.state.value == "failed"
    assert "needs an sdxl base and an sdxl-refiner" in (record.error or "")
    assert record.get("reason") == "invalid_input"
    client.close()


def test_sdfarm_render_with_a_refiner_renders_the_farm_s_pixels(
    sdxl: LoadedModel, refiner: LoadedModel, tmp_path: Path
) -> None:
    # Given the base and refiner folders, When `sdfarm render` renders a refined job
    out = tmp_path / "refined.png"
    argv = ["--model", sdxl.path, "--refiner", refiner.path, "--refiner-switch-at", "0.7"]
    argv += ["--prompt", ROW.prompt, "--negative-prompt", ROW.negative_prompt]
    argv += ["--seed", str(ROW.seed), "--steps", str(STEPS), "--scheduler", "euler_a"]
    assert worker_cli("render", [*argv, "--out", str(out)]) == 0
    # Then its pixels are the sampling loop's with the refiner, and its PNG names the refiner
    params = PassParams(STEPS, 64, 64, "euler_a", refiner_switch_at=0.7)
    ours = render_pass(sdxl, [ROW], params, refiner=refiner).images[0]
    data = out.read_bytes()
    assert difference(np.asarray(Image.open(out).convert("RGB")), ours) == 0
    assert "Refiner switch at: 0.7" in read_png_metadata(data)["parameters"]
    # And --refiner-switch-at alone is refused with a message
    assert worker_cli("render", [*argv[4:], "--model", sdxl.path, "--refiner-switch-at", "0.5",
                                 "--out", str(out)]) == 2  # fmt: skip
