"""Every sampler renders diffusers' pixels, on SD 1.x- and SD 2.x-style (v-prediction) models.

The reference is `StableDiffusionPipeline` on the same tiny model folder, with the scheduler class
each sampler name stands for, configured from the model's own scheduler config as written out in
REFERENCE below (independently of worker/schedulers.py), the same prompt, negative prompt, seed,
guidance, steps and size. Images are compared as 8-bit pixels, within ±2 levels per channel. Then
a batch of 8 mixed jobs, with a stochastic sampler, renders what each job renders alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from shared.jobs import SCHEDULERS
from shared.metadata import SAMPLER_LABELS
from tests.reporting import difference_report
from worker import schedulers
from worker.models import LoadedModel, load_model
from worker.sampler import PassParams, Row, render_pass
from worker.tiny import make_tiny

PIXEL_TOLERANCE = 2  # levels of 255, per channel
STEPS = 8
ROW = Row("a lighthouse on a rocky coast, sunset", "blurry, low quality", 4242, 7.5)

# name -> (diffusers class, settings on top of the model's config, A1111's label)
REFERENCE: dict[str, tuple[Any, dict[str, Any], str]] = {
    "lms": (LMSDiscreteScheduler, {}, "LMS"),
    "euler": (EulerDiscreteScheduler, {}, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "Euler a"),
    "heun": (HeunDiscreteScheduler, {}, "Heun"),
    "ddim": (DDIMScheduler, {}, "DDIM"),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}, "PLMS"),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "unipc": (UniPCMultistepScheduler, {}, "UniPC"),
    # diffusers seeds its one Brownian tree from the config; sdfarm seeds one per row, from the
    # row's seed, so at batch size 1 the two draw the same noise.
    "dpmpp_sde": (DPMSolverSDEScheduler, {"noise_sampler_seed": ROW.seed}, "DPM++ SDE"),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pipeline_for(model_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe: Any, name: str, row: Row, **prompt: Any) -> np.ndarray:
    """diffusers' 64x64 image of `row` with sampler `name`; `prompt` replaces the row's prompt
    and negative prompt as the pipeline's arguments (embeddings, `clip_skip`, ...)."""
    cls, settings, _ = REFERENCE[name]
    # From the model folder's own config, not from the scheduler a previous test left behind.
    config = LMSDiscreteScheduler.load_config(Path(pipe.name_or_path) / "scheduler")
    pipe.scheduler = cls.from_config(config, **settings)
    with warnings.catch_warnings():
        # torchsde warns when diffusers' DPM++ SDE asks an ulp outside its Brownian tree.
        warnings.filterwarnings("ignore", "Should have t", UserWarning)
        text = prompt or {"prompt": row.prompt, "negative_prompt": row.negative_prompt}
        image = pipe(
            **text,
            num_inference_steps=STEPS,
            guidance_scale=row.guidance,
            height=64,
            width=64,
            generator=[torch.Generator().manual_seed(row.seed)],
            output_type="np",
        ).images[0]
    return (image * 255).round().astype(np.uint8)


def difference(a: np.ndarray | None, b: np.ndarray | None) -> int:
    assert a is not None and b is not None
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> StableDiffusionPipeline:
    return pipeline_for(tiny_model_dir)


@pytest.fixture(scope="module")
def v_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-v", prediction_type="v_prediction")


@pytest.fixture(scope="module")
def v_model(v_model_dir: Path) -> LoadedModel:
    return load_model("tiny-v", str(v_model_dir))


@pytest.fixture(scope="module")
def v_pipe(v_model_dir: Path) -> StableDiffusionPipeline:
    return pipeline_for(v_model_dir)


report = difference_report(f"max pixel difference vs the reference (tolerance {PIXEL_TOLERANCE})")


def test_every_sampler_name_the_api_accepts_has_a_scheduler_and_an_a1111_label() -> None:
    assert set(SCHEDULERS) == set(schedulers.SCHEDULERS) == set(REFERENCE)
    assert {name: SAMPLER_LABELS[name] for name in SCHEDULERS} == {
        name: label for name, (_, _, label) in REFERENCE.items()
    }


@pytest.mark.parametrize("name", list(REFERENCE))
def test_each_sampler_renders_the_pixels_diffusers_renders(
    model: LoadedModel, pipe: StableDiffusionPipeline, name: str, report: Callable[..., None]
) -> None:
    # Given one row, When sdfarm and diffusers render it with this sampler
    ours = render_pass(model, [ROW], PassParams(STEPS, 64, 64, name)).images[0]
    theirs = diffusers_image(pipe, name, ROW)
    # Then the pixels agree within the tolerance, and the image is not flat
    diff = difference(ours, theirs)
    report(f"{name} (epsilon)", diff)
    assert diff <= PIXEL_TOLERANCE
    assert ours is not None and ours.std() > 5


@pytest.mark.parametrize("name", list(REFERENCE))
def test_each_sampler_renders_diffusers_pixels_on_a_v_prediction_model(
    v_model: LoadedModel, v_pipe: StableDiffusionPipeline, name: str, report: Callable[..., None]
) -> None:
    # Given an SD 2.x-style model that predicts v, When both render with this sampler
    ours = render_pass(v_model, [ROW], PassParams(STEPS, 64, 64, name)).images[0]
    theirs = diffusers_image(v_pipe, name, ROW)
    # Then the prediction type came from the model and the pixels agree
    assert v_model.prediction_type == "v_prediction"
    diff = difference(ours, theirs)
    report(f"{name} (v_prediction)", diff)
    assert diff <= PIXEL_TOLERANCE


MIXED = [
    Row("a photo of a cat", "blurry", 1, 7.5),
    Row("an oil painting of a castle on a hill", "", 22, 3.0),
    Row("a red sports car, motion blur", "watermark, text", 333, 12.0),
    Row("portrait of an old man, 35mm film", "cartoon", 4444, 7.5),
    Row("a photo of a cat", "blurry", 55555, 7.5),
    Row("a bowl of fruit on a wooden table", "ugly", 6, 1.0),
    # A long prompt encoded in chunks: longer CLIP states, so a separate U-Net batch.
    Row(
        ", ".join(["a cozy cabin in the snow, warm light in the window"] * 12),
        "",
        7,
        6.0,
        None,
        "chunk",
    ),
    Row("a dragon flying over the ocean", "low quality, deformed", 88, 20.0),
]


def together_and_alone(
    model: LoadedModel, rows: list[Row], params: PassParams, refiner: LoadedModel | None = None
) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
    """The rows' images rendered in one pass, and each rendered alone."""
    together = render_pass(model, rows, params, refiner=refiner).images
    alone = [render_pass(model, [row], params, refiner=refiner).images[0] for row in rows]
    return together, alone


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_sde"])
def test_eight_mixed_jobs_render_the_same_together_as_one_by_one(
    model: LoadedModel, name: str, report: Callable[..., None]
) -> None:
    # Given 8 jobs with different prompts, negative prompts, guidance scales and seeds
    params = PassParams(STEPS, 64, 64, name)
    # When they render in one pass, and each alone
    together, alone = together_and_alone(model, MIXED, params)
    # Then every job's image is the same either way
    diff = max(difference(a, b) for a, b in zip(together, alone, strict=True))
    report(f"{name} batch of 8 vs alone", diff)
    assert diff <= PIXEL_TOLERANCE
    # And two jobs with the same prompt but other seeds differ (the noise is per row)
    assert difference(together[0], together[4]) > 10 * PIXEL_TOLERANCE
