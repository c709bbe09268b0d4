"""The sampling loop gives diffusers' pixels, on a tiny model of the real SD 1.x architecture.

The reference is `StableDiffusionPipeline` on the same model folder with the same prompts, seeds,
steps, guidance and size; images are compared as 8-bit pixels, within ±2 levels per channel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from shared.errors import InvalidJob, ModelLoadError, RenderCancelled
from worker.models import LoadedModel, load_model
from worker.sampler import PassParams, Row, render_pass
from worker.tiny import make_tiny

# numpy 2.4 warns when torch's Tensor.__array__ lacks a `copy` argument, and LMSDiscreteScheduler
# calls np.array(tensor) when it is built and in set_timesteps; nothing on our side can avoid it.
PIXEL_TOLERANCE = 2  # levels of 255, per channel
pytestmark = pytest.mark.usefixtures("one_torch_thread")
PARAMS = PassParams(steps=10, width=64, height=64)
GUIDANCE = 7.5


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: Path) -> Iterator[StableDiffusionPipeline]:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    yield pipe


def diffusers_images(pipe: StableDiffusionPipeline, rows: list[Row]) -> list[np.ndarray]:
    """The pipeline's images for `rows`, one CPU generator per row, as uint8 like numpy_to_pil."""
    assert len({row.guidance for row in rows}) == 1, "diffusers takes one guidance scale"
    images = pipe(
        prompt=[row.prompt for row in rows],
        negative_prompt=[row.negative_prompt for row in rows],
        num_inference_steps=PARAMS.steps,
        guidance_scale=rows[0].guidance,
        height=PARAMS.height,
        width=PARAMS.width,
        generator=[torch.Generator().manual_seed(row.seed) for row in rows],
        output_type="np",
    ).images
    return [(image * 255).round().astype(np.uint8) for image in images]


def max_difference(ours: list[np.ndarray], theirs: list[np.ndarray]) -> int:
    return max(
        int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(ours, theirs, strict=True)
    )


def report(capsys: pytest.CaptureFixture[str], what: str, difference: int) -> None:
    with capsys.disabled():
        print(f"\n  max pixel difference, {what}: {difference} (tolerance {PIXEL_TOLERANCE})")


def test_a_single_row_renders_the_pixels_diffusers_renders(
    model: LoadedModel, pipeline: StableDiffusionPipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given one row with a prompt, a negative prompt, a seed and a guidance scale
    rows = [Row("a photo of a cat, highly detailed", "blurry, low quality", 1234, GUIDANCE)]
    # When sdfarm and the diffusers pipeline render it
    ours = render_pass(model, rows, PARAMS).images
    theirs = diffusers_images(pipeline, rows)
    # Then the images agree pixel for pixel, within the tolerance
    assert ours[0].shape == (64, 64, 3) and ours[0].dtype == np.uint8
    difference = max_difference(ours, theirs)
    report(capsys, "batch of 1 vs diffusers", difference)
    assert difference <= PIXEL_TOLERANCE


def test_a_batch_of_four_rows_renders_what_diffusers_renders_with_a_generator_per_row(
    model: LoadedModel, pipeline: StableDiffusionPipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given four rows with different prompts, negative prompts and seeds
    rows = [
        Row("a photo of a cat", "blurry", 1, GUIDANCE),
        Row("an oil painting of a castle on a hill", "", 22, GUIDANCE),
        Row("a red sports car, motion blur", "watermark, text", 333, GUIDANCE),
        Row("portrait of an old man, 35mm film", "cartoon", 4444, GUIDANCE),
    ]
    # When sdfarm renders them in one pass, and diffusers with one generator per row
    ours = render_pass(model, rows, PARAMS).images
    theirs = diffusers_images(pipeline, rows)
    # Then every image matches its own row's, in order
    difference = max_difference(ours, theirs)
    report(capsys, "batch of 4 vs diffusers", difference)
    assert difference <= PIXEL_TOLERANCE


def test_a_v_prediction_model_renders_the_pixels_diffusers_renders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an SD 2.x-style model that predicts v instead of the noise
    model_dir = make_tiny(tmp_path / "tiny-v", prediction_type="v_prediction")
    model = load_model("tiny-v", str(model_dir))
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    rows = [Row("a forest with tall trees and fog", "blurry", 99, GUIDANCE)]
    # When both render the same row
    ours = render_pass(model, rows, PARAMS).images
    theirs = diffusers_images(pipe, rows)
    # Then the prediction type was read from the model and the pixels agree
    assert model.prediction_type == "v_prediction"
    difference = max_difference(ours, theirs)
    report(capsys, "v-prediction vs diffusers", difference)
    assert difference <= PIXEL_TOLERANCE


def test_a_row_renders_the_same_alone_and_batched_with_other_guidance_scales(
    model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a row, and a batch where it sits between rows with other seeds and guidance scales
    row = Row("a lighthouse on a rocky coast", "blurry", 7, 9.0)
    batch = [Row("a dog", "", 8, 3.0), row, Row("a bird on a branch", "ugly", 9, 12.0)]
    # When it is rendered alone and in the batch
    alone = render_pass(model, [row], PARAMS).images
    batched = render_pass(model, batch, PARAMS).images
    # Then its image does not depend on its batch-mates
    difference = max_difference(alone, batched[1:2])
    report(capsys, "alone vs batched with other guidance", difference)
    assert difference <= PIXEL_TOLERANCE


def test_different_seeds_give_different_images(model: LoadedModel) -> None:
    # Given the same prompt under two seeds
    rows = [Row("a photo of a cat", "", 1, GUIDANCE), Row("a photo of a cat", "", 2, GUIDANCE)]
    # When they are rendered
    first, second = render_pass(model, rows, PARAMS).images
    # Then the images differ clearly, and neither is flat or clipped to black or white
    assert np.abs(first.astype(int) - second.astype(int)).max() > 10 * PIXEL_TOLERANCE
    for image in (first, second):
        assert image.std() > 5
        assert ((image == 0) | (image == 255)).mean() < 0.1


def test_the_tokenizer_loads_in_transformers_and_wraps_a_prompt_in_bos_and_eos(
    tiny_model_dir: Path,
) -> None:
    # Given the tokenizer folder of the tiny model
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    # When a prompt is encoded
    ids = tokenizer("a photo of a cat").input_ids
    # Then it starts with <|startoftext|>, ends with <|endoftext|>, and pads as SD 1.x's does
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    words = ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == words
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == "<|endoftext|>"


def test_the_tiny_model_folder_is_under_10_mb(tiny_model_dir: Path) -> None:
    size = sum(f.stat().st_size for f in tiny_model_dir.rglob("*") if f.is_file())
    assert size < 10 * 1024 * 1024, f"tiny model is {size / 1e6:.1f} MB"


def test_a_width_not_divisible_by_8_is_refused_with_the_value(model: LoadedModel) -> None:
    params = PassParams(steps=2, width=500, height=64)
    with pytest.raises(InvalidJob, match="`width` has to be divisible by 8 but is 500"):
        render_pass(model, [Row("a cat", "", 1, GUIDANCE)], params)


def test_progress_is_reported_after_every_step_and_a_raising_callback_cancels(
    model: LoadedModel,
) -> None:
    # Given a callback that records progress and cancels after the third step
    seen: list[tuple[int, int]] = []

    def on_step(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 3:
            raise RenderCancelled("job cancelled")

    # When a pass runs with it, Then the cancellation propagates after exactly three steps
    with pytest.raises(RenderCancelled):
        render_pass(model, [Row("a cat", "", 1, GUIDANCE)], PARAMS, on_step=on_step)
    assert seen == [(1, 10), (2, 10), (3, 10)]


def test_a_missing_model_folder_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("ghost", str(tmp_path / "nowhere"))
