"""Prompts past CLIP's 75 tokens are never cut silently: truncated with a warning naming the
dropped words, or encoded in 75-token chunks (A1111's behaviour) with `long_prompt="chunk"`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from worker.models import LoadedModel, load_model
from worker.prompts import CHUNK_TOKENS, encode_rows
from worker.sampler import PassParams, Row, render_pass

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = PassParams(6, 64, 64, "euler")
HEAD = "a photo of a cat, highly detailed, " * 12  # 96 tokens: past 75 already
TAIL_A = "the moon over a castle on a hill"
TAIL_B = "a dog sitting in a field of flowers"


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


def tokens(model: LoadedModel, text: str) -> int:
    return len(model.tokenizer(text, add_special_tokens=False).input_ids)


def pixels(model: LoadedModel, row: Row) -> np.ndarray:
    image = render_pass(model, [row], PARAMS).images[0]
    assert image is not None
    return image.astype(int)


def test_a_truncated_prompt_warns_naming_the_dropped_words_and_renders_what_diffusers_renders(
    model: LoadedModel,
    tiny_model_dir: Path,
) -> None:
    # Given a prompt of more than 75 tokens whose end is a recognisable phrase
    prompt = HEAD + TAIL_A
    assert tokens(model, HEAD) > CHUNK_TOKENS
    # When it is rendered in the default (truncate) mode, as plain text (diffusers cuts at the
    # 75th token; A1111's syntax would cut at the last comma before it, tests/test_a1111_prompts.py)
    result = render_pass(model, [Row(prompt, "", 3, 7.5, prompt_syntax="plain")], PARAMS)
    # Then the row's warning says how long it was and names the words CLIP never saw
    (warning,) = result.warnings[0]
    assert f"prompt is {tokens(model, prompt)} tokens; CLIP reads 75" in warning
    assert TAIL_A in warning and "long_prompt" in warning
    # And the image is the one diffusers renders (it truncates the same way)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(
        prompt=prompt,
        num_inference_steps=PARAMS.steps,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images[0]
    assert result.images[0] is not None
    diff = np.abs(result.images[0].astype(int) - (theirs * 255).round().astype(int)).max()
    assert diff <= 2


def test_truncation_drops_what_chunking_keeps(model: LoadedModel) -> None:
    # Given two long prompts that differ only after the 75th token
    a, b = HEAD + TAIL_A, HEAD + TAIL_B
    # When truncated, Then the difference is lost: the images are the same (within float noise)
    same = np.abs(pixels(model, Row(a, "", 4, 7.5)) - pixels(model, Row(b, "", 4, 7.5))).max()
    assert same <= 2
    # When chunked, Then the words past the 75th token reach CLIP: the second chunk's states
    # differ, the first chunk's do not
    ea, eb = encode_rows(model, [(a, "", "chunk"), (b, "", "chunk")])
    assert ea.cond.shape == (1, 2 * 77, 32)
    assert torch.equal(ea.cond[:, :77], eb.cond[:, :77])
    assert not torch.allclose(ea.cond[:, 77:], eb.cond[:, 77:])
    # And the U-Net sees them: a chunked prompt renders far from its truncation, and the two
    # tails give different images (weakly: the tiny model's text attention is weak), silently
    rows = [
        Row(p, "", 4, 15.0, None, mode) for p, mode in ((a, "chunk"), (b, "chunk"), (a, "truncate"))
    ]
    result = render_pass(model, rows, PARAMS)
    first, second, truncated = (image.astype(int) for image in result.images if image is not None)
    assert np.abs(first - truncated).max() > 20
    assert np.abs(first - second).max() > 2
    assert result.warnings[:2] == [[], []] and len(result.warnings[2]) == 1


def test_a_short_prompt_renders_the_same_in_chunk_mode(model: LoadedModel) -> None:
    row = Row("a castle on a hill, matte painting", "blurry", 8, 7.5)
    chunked = Row(row.prompt, row.negative_prompt, row.seed, row.guidance, None, "chunk")
    assert np.abs(pixels(model, row) - pixels(model, chunked)).max() <= 2


def test_prompt_and_negative_prompt_get_the_same_number_of_chunks(model: LoadedModel) -> None:
    # Given a short prompt and a negative prompt of two chunks, in chunk mode
    negative = "blurry, low quality, " * 20
    assert CHUNK_TOKENS < tokens(model, negative) <= 2 * CHUNK_TOKENS
    (encoded,) = encode_rows(model, [("a cat", negative, "chunk")])
    # Then both are two chunks of 77 states, and the prompt's second chunk is an empty one:
    # exactly CLIP's states for "" (start token, end token, padding)
    assert encoded.cond.shape == encoded.uncond.shape == (1, 154, 32)
    (empty,) = encode_rows(model, [("", "", "truncate")])
    assert torch.equal(encoded.cond[:, 77:], empty.cond)
