"""Prompts to CLIP states: 75 tokens at a time, cut with a warning or encoded in chunks.

CLIP reads 77 positions: a start token, 75 prompt tokens and an end token (then padding). A longer
prompt is never cut silently. With `long_prompt="truncate"` the words past the 75th token are
dropped and named in a warning that reaches the job record; with `long_prompt="chunk"` the prompt
is split into 75-token chunks, each wrapped in start and end tokens and encoded on its own, and
the states are concatenated (A1111's behaviour), so the U-Net attends to all of it. A row's prompt
and negative prompt always get the same number of chunks: the shorter is padded with empty
chunks, as A1111 does, since the U-Net batch holds both.

Every 77-token sequence is encoded independently of the others, so a row's states do not depend
on its batch-mates.

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
from typing import Any

import torch

from worker.models import LoadedModel

__all__ = ["CHUNK_TOKENS", "EncodedRow", "encode_rows"]

log = logging.getLogger(__name__)

CHUNK_TOKENS = 75  # prompt tokens CLIP reads between its start and end tokens


@dataclass
class EncodedRow:
    """One row's CLIP states, (1, 77 * chunks, hidden) each, and what was lost on the way; for
    SDXL also its pooled embeddings, (1, projection) each."""

    cond: torch.Tensor
    uncond: torch.Tensor
    warnings: list[str]
    pooled_cond: torch.Tensor | None = None
    pooled_uncond: torch.Tensor | None = None


def _chunks(ids: list[int], mode: str) -> list[list[int]]:
    if mode == "chunk":
        return [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)] or [[]]
    return [ids[:CHUNK_TOKENS]]


def _dropped(model: LoadedModel, what: str, ids: list[int]) -> str:
    words = model.tokenizer.decode(ids[CHUNK_TOKENS:]).strip()
    return (
        f"{what} is {len(ids)} tokens; CLIP reads {CHUNK_TOKENS}, so these words were dropped: "
        f"{words!r} (set long_prompt to 'chunk' to keep them)"
    )


def encode_rows(model: LoadedModel, prompts: Sequence[tuple[str, str, str]]) -> list[EncodedRow]:
    """CLIP states for each (prompt, negative prompt, long_prompt mode), in row order."""
    tokenizer = model.tokenizer
    texts = [text for prompt, negative, _ in prompts for text in (prompt, negative)]
    token_ids: list[list[int]] = tokenizer(texts, add_special_tokens=False).input_ids
    sequences: list[list[int]] = []  # every chunk of every text, as the encoder's batch
    spans: list[tuple[int, int, int]] = []  # per row: first cond chunk, first uncond, count
    warnings: list[list[str]] = []
    for row, (_, _, mode) in enumerate(prompts):
        cond_ids, uncond_ids = token_ids[2 * row], token_ids[2 * row + 1]
        row_warnings = [
            _dropped(model, what, ids)
            for what, ids in (("prompt", cond_ids), ("negative prompt", uncond_ids))
            if mode != "chunk" and len(ids) > CHUNK_TOKENS
        ]
        for warning in row_warnings:
            log.info("row %d: %s", row, warning)  # the job record and the CLI show it
        cond, uncond = _chunks(cond_ids, mode), _chunks(uncond_ids, mode)
        count = max(len(cond), len(uncond))
        cond += [[]] * (count - len(cond))
        uncond += [[]] * (count - len(uncond))
        spans.append((len(sequences), len(sequences) + count, count))
        sequences += cond + uncond
        warnings.append(row_warnings)
    states, pooled = _encode_sequences(model, sequences)
    out = []
    for (first, second, count), row_warnings, (_, negative, _) in zip(
        spans, warnings, prompts, strict=True
    ):
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
            if model.force_zeros_for_empty_prompt and negative == "":
                encoded.uncond = torch.zeros_like(encoded.cond)
                encoded.pooled_uncond = torch.zeros_like(encoded.pooled_cond)
        out.append(encoded)
    return out


def _encode_sequences(
    model: LoadedModel, sequences: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each chunk's states (start token, the chunk, end token, padding), and SDXL's pooled ones.

    SD 1.x/2.x: CLIP's last hidden state. SDXL: both encoders' penultimate hidden states side by
    side, and the second encoder's projection.
    """
    encoder = model.text_encoder
    if model.text_encoder_2 is None or model.tokenizer_2 is None:
        assert encoder is not None  # only an SDXL refiner lacks the first encoder
        output = encoder(*_inputs(model, model.tokenizer, encoder, sequences))
        return output[0].to(dtype=model.dtype), None
    states = []
    if encoder is not None:  # not for an SDXL refiner, which reads the second encoder alone
        first = encoder(
            *_inputs(model, model.tokenizer, encoder, sequences), output_hidden_states=True
        )
        states.append(first.hidden_states[-2])
    second = model.text_encoder_2(
        *_inputs(model, model.tokenizer_2, model.text_encoder_2, sequences),
        output_hidden_states=True,
    )
    states.append(second.hidden_states[-2])
    joined = torch.cat(states, dim=-1)
    pooled = _projected(model.text_encoder_2, second.last_hidden_state, sequences)
    return joined.to(dtype=model.dtype), pooled.to(dtype=model.dtype)


def _projected(
    encoder: Any, last_hidden_state: torch.Tensor, sequences: list[list[int]]
) -> torch.Tensor:
    """The second encoder's pooled embedding (its final state at each end token, projected),
    one sequence at a time: a batched projection rounds differently from one of a single row, and
    a row's conditioning must not depend on its batch-mates (nor differ from diffusers', which
    projects each prompt alone)."""
    ends = [len(chunk) + 1 for chunk in sequences]  # the start token, the chunk, then the end
    return torch.cat(
        [encoder.text_projection(last_hidden_state[i : i + 1, end]) for i, end in enumerate(ends)]
    )


def _inputs(
    model: LoadedModel, tokenizer: Any, encoder: Any, sequences: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder's input ids for the chunks, padded to 77, and its attention mask if any."""
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    masks = []
    for chunk in sequences:
        ids = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        rows.append(ids + [pad] * (length - len(ids)))
        masks.append([1] * len(ids) + [0] * (length - len(ids)))
    input_ids = torch.tensor(rows, dtype=torch.long, device=model.device)
    # SD's U-Net was trained on CLIP states computed without an attention mask, padding included;
    # as in diffusers, only a text encoder whose config asks for a mask gets one.
    attention_mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        attention_mask = torch.tensor(masks, dtype=torch.long, device=model.device)
    return input_ids, attention_mask
