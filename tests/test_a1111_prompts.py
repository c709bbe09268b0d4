"""A1111's prompt syntax and clip skip: read as A1111 documents them, rendered as diffusers renders.

The parser is checked on A1111's own examples; emphasis on its properties (weights of 1 change
nothing, bit for bit; only a group's tokens are scaled; the mean is restored); chunking on where
BREAK and the comma backtrack split. Then through the sampler: our weighted prompt embeddings,
given to diffusers' pipelines as `prompt_embeds`, render our pixels (same seed, sampler, steps),
and `clip_skip=2` renders what diffusers renders with its `clip_skip=1`, on SD 1.x and SDXL.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel

from shared.a1111_syntax import BREAK, Break, Piece, PromptSyntaxError, parse_prompt
from shared.errors import InvalidJob
from shared.jobs import JobSpec
from tests.reporting import difference_report
from tests.test_samplers import PIXEL_TOLERANCE, STEPS, difference, diffusers_image
from worker.models import LoadedModel, load_model
from worker.prompt_chunks import a1111_chunks
from worker.prompts import EncodedRow, encode_rows
from worker.rows import row_for
from worker.sampler import PassParams, Row, render_pass

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLER = "euler"
PARAMS = PassParams(STEPS, 64, 64, SAMPLER)
WEIGHTED = Row(
    "a lighthouse on a (rocky coast:1.8), [[sunset]], ((dramatic sky))",
    "(blurry:1.5), low quality",
    4242,
    7.5,
)

# A1111's examples (its `parse_prompt_attention` docstring and wiki) and what it reads them as.
EXAMPLES: list[tuple[str, list[Piece | Break]]] = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.3 * 1.1 * 1.1),
            (" ", 1.1),
            ("on", 1.1 / 1.1),
            (" a ", 1.1),
            ("hill", 0.5 * 1.1),
            (", sun, ", 1.1),
            ("sky", 1.1 * 1.1 * 1.1 * 1.1),
            (".", 1.1),
        ],
    ),
    (
        "((a)) [b] [[c]]",
        [("a", 1.1 * 1.1), (" ", 1.0), ("b", 1 / 1.1), (" ", 1.0), ("c", 1 / 1.1 / 1.1)],
    ),
    ("(cat:1.3) and [dog", [("cat", 1.3), (" and ", 1.0), ("dog", 1 / 1.1)]),
    ("( cat : 0.5 )", [(" cat ", 0.5)]),
    ("stray ) and ] brackets", [("stray ) and ] brackets", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    ("score: 9", [("score: 9", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), BREAK, ("a dog", 1.0)]),
    ("a cat, break, BREAKfast", [("a cat, break, BREAKfast", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


@pytest.fixture(scope="module")
def biased_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x with a bias in CLIP's final layer norm, as real CLIP has one.

    The tiny model's norm has none, so its states' mean is 0 but for rounding, and A1111's mean
    restore (a ratio of two means) would scale by noise; real CLIP's states have a mean well
    away from 0 (its norm's bias), which is what the restore was written for.
    """
    folder = tmp_path_factory.mktemp("models") / "tiny-biased"
    shutil.copytree(tiny_model_dir, folder)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    with torch.no_grad():
        bias = encoder.final_layer_norm.bias
        bias.copy_(torch.linspace(-0.6, 0.4, bias.numel()))  # mean -0.1
    encoder.save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def biased(biased_dir: Path) -> LoadedModel:
    return load_model("tiny-biased", str(biased_dir))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir: Path) -> LoadedModel:
    return load_model("tiny-sdxl", str(tiny_sdxl_dir))


report = difference_report(f"A1111 prompts: max pixel difference (tolerance {PIXEL_TOLERANCE})")


def encode(model: LoadedModel, row: Row, mode: str = "truncate") -> EncodedRow:
    with torch.inference_mode():
        (encoded,) = encode_rows(
            model, [(row.prompt, row.negative_prompt, mode, row.prompt_syntax, row.clip_skip)]
        )
    return encoded


def ours(model: LoadedModel, *rows: Row) -> list[np.ndarray | None]:
    return render_pass(model, list(rows), PARAMS).images


def theirs(pipe: Any, row: Row, **prompt: Any) -> np.ndarray:
    """diffusers' image for the row, the prompt given as `prompt` (text or embeddings)."""
    return diffusers_image(pipe, SAMPLER, row, **prompt)


def embeds(encoded: EncodedRow) -> dict[str, torch.Tensor]:
    out = {"prompt_embeds": encoded.cond, "negative_prompt_embeds": encoded.uncond}
    if encoded.pooled_cond is not None and encoded.pooled_uncond is not None:
        out["pooled_prompt_embeds"] = encoded.pooled_cond
        out["negative_pooled_prompt_embeds"] = encoded.pooled_uncond
    return out


def ids(model: LoadedModel, text: str) -> list[int]:
    return list(model.tokenizer(text, add_special_tokens=False).input_ids)


def sd_pipeline(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if not hasattr(pipe.text_encoder, "text_model"):
        # diffusers 0.42's clip_skip reads `text_encoder.text_model.final_layer_norm`, which
        # transformers >= 5.6 moved onto CLIPTextModel itself: point it there.
        norm = pipe.text_encoder.final_layer_norm
        object.__setattr__(pipe.text_encoder, "text_model", SimpleNamespace(final_layer_norm=norm))
    return pipe


def clip_skipped(pipe: Any, text: str, clip_skip: int) -> dict[str, torch.Tensor]:
    """diffusers' own embeddings of `text` at its `clip_skip`, as a prompt's (pooled for SDXL)."""
    with torch.no_grad():
        out = pipe.encode_prompt(
            text,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=clip_skip,
        )
    return {"embeds": out[0], "pooled": out[2]} if len(out) == 4 else {"embeds": out[0]}


def shown(items: list[Piece | Break]) -> list[tuple[str, float] | str]:
    """Pieces with their weights rounded (A1111 computes 1.3 * 1.1 * 1.1 as 1.5730000000000004)."""
    return ["BREAK" if isinstance(i, Break) else (i[0], round(i[1], 12)) for i in items]


# --- the parser -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), EXAMPLES)
def test_the_parser_reads_a1111s_examples_as_a1111_does(
    text: str, expected: list[Piece | Break]
) -> None:
    # Given one of A1111's examples, When it is parsed, Then the pieces and weights are A1111's
    assert shown(parse_prompt(text)) == shown(expected)


def test_a_weight_that_is_not_a_number_is_refused_saying_how_to_write_it(
    model: LoadedModel,
) -> None:
    # Given a weight A1111 cannot read, When it is parsed, Then the error says where and how
    with pytest.raises(PromptSyntaxError, match=r"weight '1.2.3' at character 6 .*\(text:1.3\)"):
        parse_prompt("a (cat:1.2.3)")
    # And the job is told which prompt, not rendered with a guess
    with pytest.raises(InvalidJob, match=r"row 0: the prompt 'a \(cat:1.2.3\)': the weight"):
        encode(model, Row("a (cat:1.2.3)", "", 1, 7.5))


# --- emphasis: properties -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a1111", "plain"),
    [
        ("a photo of a cat, highly detailed", "a photo of a cat, highly detailed"),
        ("(a photo:1.0) of a cat, (highly detailed:1)", "a photo of a cat, highly detailed"),
        ("", ""),
    ],
)
@pytest.mark.parametrize("mode", ["truncate", "chunk"])
def test_weights_of_one_give_the_states_of_plain_text_bit_for_bit(
    biased: LoadedModel, a1111: str, plain: str, mode: str
) -> None:
    # Given a prompt whose every weight is 1 in A1111's syntax, and its words as plain text
    ours_ = encode(biased, Row(a1111, "(low quality:1)", 1, 7.5), mode)
    text = encode(biased, Row(plain, "low quality", 1, 7.5, prompt_syntax="plain"), mode)
    # Then the states are the same, bit for bit
    assert torch.equal(ours_.cond, text.cond) and torch.equal(ours_.uncond, text.uncond)


def test_a_long_prompt_without_weights_has_plain_texts_states_chunk_by_chunk(
    biased: LoadedModel,
) -> None:
    # Given a long prompt without syntax, chunked as A1111 chunks it (at a comma)
    prompt = "a photo of a cat, highly detailed, " * 12
    chunks = a1111_chunks(biased.tokenizer, prompt)
    assert len(chunks) == 2 and chunks[0].ended_by == "comma"
    encoded = encode(biased, Row(prompt, "", 1, 7.5), "chunk")
    # Then each chunk's states are those of its words sent as plain text, bit for bit
    for i, chunk in enumerate(chunks):
        words = biased.tokenizer.decode(chunk.ids)
        assert ids(biased, words) == chunk.ids
        alone = encode(biased, Row(words, "", 1, 7.5, prompt_syntax="plain"))
        assert torch.equal(encoded.cond[:, 77 * i : 77 * (i + 1)], alone.cond)


def test_only_the_tokens_inside_a_group_are_scaled_and_the_mean_is_restored(
    biased: LoadedModel,
) -> None:
    model = biased
    # Given a prompt with one emphasised word, and the same text without the brackets
    weighted = encode(model, Row("a photo of a (cat:1.5) on a hill", "", 1, 7.5)).cond[0]
    plain = encode(model, Row("a photo of a cat on a hill", "", 1, 7.5)).cond[0]
    # Then each position's states are scaled by one factor, and the group's by 1.5 times it
    cat = 1 + len(ids(model, "a photo of a "))  # after the start token
    assert ids(model, "cat") == [ids(model, "a photo of a cat")[cat - 1]]
    ratio = weighted / plain
    factor = ratio[0, 0]
    expected = torch.full_like(ratio, float(factor))
    expected[cat] *= 1.5
    torch.testing.assert_close(ratio, expected, rtol=1e-4, atol=1e-4)
    assert abs(float(factor) - 1) > 1e-3  # the restoring factor is not a no-op here
    # And the states' mean is the mean before the weights were applied
    torch.testing.assert_close(weighted.mean(), plain.mean(), rtol=1e-5, atol=1e-6)


def test_sdxl_restores_each_encoders_mean_on_its_own_and_leaves_the_pooled_embedding(
    sdxl: LoadedModel,
) -> None:
    weighted = encode(sdxl, Row("a photo of a (cat:1.5) on a hill", "x", 1, 7.5))
    plain = encode(sdxl, Row("a photo of a cat on a hill", "x", 1, 7.5))
    width = sdxl.text_encoder.config.hidden_size  # type: ignore[union-attr]
    for part in (slice(0, width), slice(width, None)):
        torch.testing.assert_close(
            weighted.cond[..., part].mean(), plain.cond[..., part].mean(), rtol=1e-5, atol=1e-6
        )
    assert not torch.equal(weighted.cond, plain.cond)
    assert weighted.pooled_cond is not None and plain.pooled_cond is not None
    assert torch.equal(weighted.pooled_cond, plain.pooled_cond)


# --- chunking -------------------------------------------------------------------------------


def test_break_ends_a_chunk_and_truncation_names_what_it_dropped(model: LoadedModel) -> None:
    # Given a prompt of two short phrases with BREAK between them
    row = Row("a cat BREAK a dog", "", 1, 7.5)
    # When chunked, Then each phrase is a chunk of its own: CLIP's states for it alone
    both = encode(model, row, "chunk")
    assert both.cond.shape == (1, 2 * 77, 32)
    for i, phrase in enumerate(("a cat", "a dog")):
        alone = encode(model, Row(phrase, "", 1, 7.5))
        assert torch.equal(both.cond[:, 77 * i : 77 * (i + 1)], alone.cond)
    # And the negative prompt gets an empty second chunk
    assert both.uncond.shape == both.cond.shape
    # When truncated, Then the first chunk is kept and the warning says BREAK dropped "a dog"
    cut = encode(model, row)
    assert torch.equal(cut.cond, both.cond[:, :77])
    (warning,) = cut.warnings
    assert "BREAK" in warning and "'a dog'" in warning


def test_a_full_chunk_moves_the_words_after_its_last_comma_to_the_next(
    model: LoadedModel,
) -> None:
    # Given 70 one-token words, a comma, and 10 more words: the chunk fills at the 75th token
    # with a comma 4 tokens before it
    assert ids(model, "cat") == [631] and len(ids(model, ",")) == 1
    text = "cat " * 70 + ", " + "dog " * 10
    chunks = a1111_chunks(model.tokenizer, text)
    # Then A1111's split: the first chunk ends at the comma, the 4 words after it move on
    assert [len(c.ids) for c in chunks] == [71, 10]
    assert chunks[0].ended_by == "comma" and chunks[0].ids[-1] == ids(model, ",")[0]
    # And with the comma further back than 20 tokens, the chunk is cut at exactly 75
    far = a1111_chunks(model.tokenizer, "cat " * 50 + ", " + "dog " * 30)
    assert [len(c.ids) for c in far] == [75, 6] and far[0].ended_by == "full"
    # And a comma as the 76th token is not backtracked over: it opens the next chunk
    at_end = a1111_chunks(model.tokenizer, "cat " * 60 + ", " + "cat " * 14 + ", dog")
    assert [len(c.ids) for c in at_end] == [75, 2]
    # And without a comma backtrack (A1111's setting at 0) it is cut at 75 as well
    assert [len(c.ids) for c in a1111_chunks(model.tokenizer, text, backtrack=0)] == [75, 6]


# --- through the sampler --------------------------------------------------------------------


def test_weighted_embeddings_render_in_diffusers_as_ours_and_unlike_plain_text(
    biased: LoadedModel, biased_dir: Path, report: Callable[..., None]
) -> None:
    # Given a row with weighted words in its prompt and negative prompt
    model, pipe = biased, sd_pipeline(biased_dir)
    # When we render it, and diffusers renders our prompt embeddings
    (image,) = ours(model, WEIGHTED)
    diff = difference(image, theirs(pipe, WEIGHTED, **embeds(encode(model, WEIGHTED))))
    report("sd1 weighted embeddings vs diffusers", diff)
    # Then the pixels agree
    assert diff <= PIXEL_TOLERANCE
    # And the same text as plain (brackets and all sent to CLIP) renders another image
    (plain,) = ours(model, replace(WEIGHTED, prompt_syntax="plain"))
    assert difference(image, plain) > PIXEL_TOLERANCE


def test_sdxl_weighted_embeddings_render_in_diffusers_as_ours(
    sdxl: LoadedModel, tiny_sdxl_dir: Path, report: Callable[..., None]
) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    (image,) = ours(sdxl, WEIGHTED)
    diff = difference(image, theirs(pipe, WEIGHTED, **embeds(encode(sdxl, WEIGHTED))))
    report("sdxl weighted embeddings (and pooled) vs diffusers", diff)
    assert diff <= PIXEL_TOLERANCE
    (plain,) = ours(sdxl, replace(WEIGHTED, prompt_syntax="plain"))
    assert difference(image, plain) > PIXEL_TOLERANCE


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_clip_skip_2_renders_diffusers_clip_skip_1_and_shares_a_pass_with_other_skips(
    arch: str, request: pytest.FixtureRequest, report: Callable[..., None]
) -> None:
    # Given two rows, one at clip skip 2 (A1111's), one at the default, in one pass
    names = ("model", "tiny_model_dir") if arch == "sd1" else ("sdxl", "tiny_sdxl_dir")
    loaded, folder = (request.getfixturevalue(name) for name in names)
    default = Row("a lighthouse on a rocky coast, sunset", "blurry, low quality", 7, 7.5)
    skipped = replace(default, clip_skip=2)
    together = ours(loaded, skipped, default)
    # When diffusers renders the same prompts with its clip_skip=1, and with none; its
    # clip_skip skips layers of the prompt only, A1111's of both: so the negative prompt's
    # embeddings at clip_skip=1 are diffusers' own too, from its encode_prompt
    if arch == "sd1":
        pipe: Any = sd_pipeline(folder)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
    text = {"prompt": skipped.prompt, "negative_prompt": skipped.negative_prompt}
    negative = clip_skipped(pipe, skipped.negative_prompt, clip_skip=1)
    at_skip = {"negative_prompt_embeds": negative["embeds"]}
    if "pooled" in negative:
        at_skip["negative_pooled_prompt_embeds"] = negative["pooled"]
    reference = [
        theirs(pipe, skipped, prompt=skipped.prompt, clip_skip=1, **at_skip),
        theirs(pipe, default, **text),
    ]
    # Then each row's pixels are diffusers', and clip skip changed the image
    diffs = [difference(a, b) for a, b in zip(together, reference, strict=True)]
    report(f"{arch} clip_skip 2 vs diffusers clip_skip=1", diffs[0])
    report(f"{arch} default clip skip, same pass, vs diffusers", diffs[1])
    assert max(diffs) <= PIXEL_TOLERANCE
    assert difference(together[0], together[1]) > PIXEL_TOLERANCE


def test_a_clip_skip_past_the_first_layer_is_refused_with_the_limit(model: LoadedModel) -> None:
    # The tiny model's CLIP has 2 layers (a real one has 12, the most JobSpec accepts)
    with pytest.raises(InvalidJob, match=r"`clip_skip` has to be at most 2 .* but is 3"):
        encode(model, Row("a cat", "", 1, 7.5, clip_skip=3))


def test_a_job_carries_its_prompt_syntax_and_clip_skip_to_its_row() -> None:
    row = row_for(JobSpec(prompt="(cat:1.2)", prompt_syntax="plain", clip_skip=2, seed=1))
    assert (row.prompt_syntax, row.clip_skip) == ("plain", 2)
    default = row_for(JobSpec(prompt="x", seed=1))
    assert (default.prompt_syntax, default.clip_skip) == ("a1111", None)
