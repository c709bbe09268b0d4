"""Prompts to CLIP states: A1111's syntax or plain text, 75 tokens at a time, cut or chunked.

CLIP reads 77 positions: a start token, 75 prompt tokens and an end token (then padding). A
row's text is read as its `prompt_syntax` says (worker/prompt_chunks.py): "a1111" (the default)
reads A1111's emphasis, `(word:1.3)`, `[word]` and `BREAK` (shared/a1111_syntax.py) and chunks as
A1111 does, at the last comma near a chunk's end; "plain" sends the text to CLIP as it is, cut
every 75 tokens. A longer prompt is never cut silently. With `long_prompt="truncate"` only the
first chunk is kept and the dropped words are named in a warning that reaches the job record;
with `long_prompt="chunk"` each chunk is wrapped in start and end tokens and encoded on its own,
and the states are concatenated (A1111's behaviour), so the U-Net attends to all of it. A row's
prompt and negative prompt always get the same number of chunks: the shorter is padded with
empty chunks, as A1111 does, since the U-Net batch holds both.

The encoders (worker/text_encoders.py) take each row's `clip_skip` (A1111's numbering) and apply
A1111's default emphasis to weighted chunks; a prompt without weights gets exactly the states it
would as plain text. Every 77-token sequence is encoded independently of the others, so a row's
states do not depend on its batch-mates.

SDXL reads two encoders, as diffusers' `StableDiffusionXLPipeline.encode_prompt` does: each
sequence goes through both, their penultimate hidden states are concatenated, and the second
encoder's projection is the row's pooled embedding (of its first chunk, as A1111 takes it). The
two tokenizers share CLIP's vocabulary and differ only in their special tokens, so one
tokenization serves both. An empty negative prompt is zeros, states and pooled alike, where the
model says `force_zeros_for_empty_prompt` (diffusers' behaviour when given no negative prompt).
SDXL's refiner has only the second encoder: its states are that encoder's alone, as diffusers'
`StableDiffusionXLImg2ImgPipeline` encodes them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from shared.a1111_syntax import PromptSyntaxError
from shared.errors import InvalidJob
from worker.models import LoadedModel
from worker.prompt_chunks import CHUNK_TOKENS, Chunk, text_chunks
from worker.text_encoders import encode_chunks

__all__ = ["CHUNK_TOKENS", "EncodedRow", "PromptRow", "encode_rows"]

log = logging.getLogger(__name__)


class PromptRow(NamedTuple):
    """What a row's conditioning is encoded from; a (prompt, negative, long_prompt) tuple is one
    with the defaults."""

    prompt: str
    negative: str
    long_prompt: str = "truncate"  # or "chunk"
    syntax: str = "a1111"  # or "plain"
    clip_skip: int | None = None  # A1111's: 1 (or None) is the last layer


@dataclass
class EncodedRow:
    """One row's CLIP states, (1, 77 * chunks, hidden) each, and what was lost on the way; for
    SDXL also its pooled embeddings, (1, projection) each."""

    cond: torch.Tensor
    uncond: torch.Tensor
    warnings: list[str]
    pooled_cond: torch.Tensor | None = None
    pooled_uncond: torch.Tensor | None = None


def encode_rows(
    model: LoadedModel,
    prompts: Sequence[PromptRow | tuple[str, str, str] | tuple[str, str, str, str, int | None]],
) -> list[EncodedRow]:
    """CLIP states for each row's prompt and negative prompt, in row order.

    Raises InvalidJob when a prompt cannot be read as A1111's syntax, or a clip skip is past
    the text encoder's first layer.
    """
    rows = [PromptRow(*p) for p in prompts]
    sequences: list[Chunk] = []  # every chunk of every text, as the encoders' batch
    clip_skips: list[int] = []  # per sequence
    spans: list[tuple[int, int, int]] = []  # per row: first cond chunk, first uncond, count
    warnings: list[list[str]] = []
    for i, row in enumerate(rows):
        cond, cond_warnings = _chunks(model, i, "prompt", row.prompt, row)
        uncond, uncond_warnings = _chunks(model, i, "negative prompt", row.negative, row)
        row_warnings = cond_warnings + uncond_warnings
        for warning in row_warnings:
            log.info("row %d: %s", i, warning)  # the job record and the CLI show it
        count = max(len(cond), len(uncond))
        cond += [Chunk() for _ in range(count - len(cond))]
        uncond += [Chunk() for _ in range(count - len(uncond))]
        spans.append((len(sequences), len(sequences) + count, count))
        sequences += cond + uncond
        clip_skips += [row.clip_skip or 1] * (2 * count)
        warnings.append(row_warnings)
    states, pooled = encode_chunks(model, sequences, clip_skips)
    out = []
    for (first, second, count), row_warnings, row in zip(spans, warnings, rows, strict=True):
        encoded = EncodedRow(
            cond=states[first : first + count].reshape(1, -1, states.shape[-1]),
            uncond=states[second : second + count].reshape(1, -1, states.shape[-1]),
            warnings=row_warnings,
        )
        if pooled is not None:
            encoded.pooled_cond, encoded.pooled_uncond = (
                pooled[first : first + 1],
                pooled[second : second + 1],
            )
            if model.force_zeros_for_empty_prompt and row.negative == "":
                encoded.uncond = torch.zeros_like(encoded.cond)
                encoded.pooled_uncond = torch.zeros_like(encoded.pooled_cond)
        out.append(encoded)
    return out


def _chunks(
    model: LoadedModel, index: int, what: str, text: str, row: PromptRow
) -> tuple[list[Chunk], list[str]]:
    try:
        return text_chunks(model.tokenizer, what, text, row.long_prompt, row.syntax)
    except PromptSyntaxError as e:
        raise InvalidJob(f"row {index}: the {what} {text!r}: {e}") from e
