"""img2img renders what diffusers' StableDiffusionImg2ImgPipeline renders, from the same image.

The reference gets the same model folder, init image, strength, prompt, negative prompt, seed,
guidance and steps, with the scheduler each sampler name stands for (tests/test_samplers.py's
REFERENCE); images are compared as 8-bit pixels within ±2 levels. Then the job spec's rules:
an init image of the wrong size or that is not an image is refused, never silently resized.
"""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LMSDiscreteScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image
from pydantic import ValidationError

from shared.errors import InvalidJob
from shared.jobs import JobSpec
from shared.routing import compat_key
from tests.test_samplers import REFERENCE
from worker.init_images import load_init_image
from worker.models import LoadedModel, load_model
from worker.rows import pass_params, row_for
from worker.sampler import PassParams, Row, render_pass

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PIXEL_TOLERANCE = 2
STEPS = 8


def init_picture(width: int = 64, height: int = 64) -> Image.Image:
    """A deterministic picture with edges and colours: a gradient, a disc and a bar."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    pixels[(x - width // 3) ** 2 + (y - height // 2) ** 2 < (width // 5) ** 2] = (230, 40, 40)
    pixels[height // 5 : height // 3, width // 2 :] = (20, 20, 200)
    return Image.fromarray(pixels.astype(np.uint8))


def png_base64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> Iterator[StableDiffusionImg2ImgPipeline]:
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    yield pipe


def diffusers_image(
    pipe: StableDiffusionImg2ImgPipeline, name: str, row: Row, strength: float
) -> np.ndarray:
    cls, settings, _ = REFERENCE[name]
    if "noise_sampler_seed" in settings:  # DPM++ SDE's Brownian tree: the row's seed
        settings = {**settings, "noise_sampler_seed": row.seed}
    config = LMSDiscreteScheduler.load_config(Path(pipe.name_or_path) / "scheduler")
    pipe.scheduler = cls.from_config(config, **settings)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Should have t", UserWarning)  # torchsde, see REFERENCE
        image = pipe(
            prompt=row.prompt,
            negative_prompt=row.negative_prompt,
            image=init_picture(),
            strength=strength,
            num_inference_steps=STEPS,
            guidance_scale=row.guidance,
            generator=[torch.Generator().manual_seed(row.seed)],
            output_type="np",
        ).images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("name", "strength"),
    [("lms", 0.6), ("euler_a", 0.75), ("heun", 0.5), ("dpmpp_2m_karras", 1.0), ("dpmpp_sde", 0.6)],
)
def test_img2img_renders_the_pixels_the_diffusers_img2img_pipeline_renders(
    model: LoadedModel,
    pipe: StableDiffusionImg2ImgPipeline,
    name: str,
    strength: float,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a job with an init image and a strength
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
    row = row_for(spec)
    # When sdfarm and diffusers render it
    ours = render_pass(model, [row], pass_params(spec)).images[0]
    theirs = diffusers_image(pipe, name, row, strength)
    # Then the pixels agree within the tolerance
    assert ours is not None
    diff = int(np.abs(ours.astype(int) - theirs.astype(int)).max())
    with capsys.disabled():
        print(f"\n  max pixel difference, img2img {name} strength {strength}: {diff}")
    assert diff <= PIXEL_TOLERANCE


def test_a_low_strength_stays_closer_to_the_init_image_than_a_high_one(model: LoadedModel) -> None:
    # Given the same job at strengths 0.25 and 1.0
    picture = np.asarray(init_picture()).astype(int)
    row = Row("a watercolor of a red ball", "", 5, 7.5, np.asarray(init_picture()))
    low, high = (
        render_pass(model, [row], PassParams(STEPS, 64, 64, "euler", strength)).images[0]
        for strength in (0.25, 1.0)
    )
    # Then the low-strength image is nearer the init image (the tiny VAE is random, so only
    # relatively): the init image really is where sampling starts
    assert low is not None and high is not None
    assert np.abs(low - picture).mean() < np.abs(high - picture).mean()


def test_an_init_image_of_another_size_is_refused_naming_both_sizes() -> None:
    with pytest.raises(ValidationError, match=r"init_image is 48x64 but the job is 64x64"):
        JobSpec(prompt="x", width=64, height=64, init_image=png_base64(init_picture(48, 64)))


def test_an_init_image_of_another_size_is_resized_only_when_the_job_asks() -> None:
    # Given a 96x80 image for a 64x64 job that asks for resizing
    spec = JobSpec(
        prompt="x",
        width=64,
        height=64,
        seed=1,
        init_image=png_base64(init_picture(96, 80)),
        resize_init=True,
    )
    # When the worker reads it, Then it has the job's size
    row = row_for(spec)
    assert row.init_image is not None and row.init_image.shape == (64, 64, 3)
    # And without resize_init the worker refuses it too (an s3:// image is only measured there)
    with pytest.raises(InvalidJob, match="is 96x80 but the job is 64x64"):
        load_init_image(base64.b64decode(spec.init_image or ""), 64, 64)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("bm90IGFuIGltYWdl", "not a PNG or JPEG image"),  # base64 of "not an image"
        ("%%%", "neither s3://bucket/key nor valid base64"),
        ("s3://", "must look like s3://bucket/key"),
    ],
)
def test_an_init_image_that_is_not_an_image_is_refused(value: str, words: str) -> None:
    with pytest.raises(ValidationError, match=words) as caught:
        JobSpec(prompt="x", init_image=value)
    assert caught.value.errors()[0]["loc"] == ("init_image",)


def test_strength_needs_an_init_image_and_at_least_one_step() -> None:
    with pytest.raises(ValidationError, match="applies only to jobs with an init_image"):
        JobSpec(prompt="x", strength=0.5)
    with pytest.raises(ValidationError, match="leaves no denoising step"):
        JobSpec(
            prompt="x",
            width=64,
            height=64,
            steps=3,
            init_image=png_base64(init_picture()),
            strength=0.2,
        )


def test_img2img_jobs_share_a_pass_only_with_jobs_of_the_same_strength() -> None:
    image = png_base64(init_picture())
    txt = JobSpec(prompt="x", width=64, height=64)
    default = JobSpec(prompt="x", width=64, height=64, init_image=image)
    half = JobSpec(prompt="x", width=64, height=64, init_image=image, strength=0.5)
    keys = {compat_key(spec) for spec in (txt, default, half)}
    assert len(keys) == 3 and compat_key(default).endswith("|img2img@0.75")
