"""Chunks through the text encoder(s): the layer each row's clip skip picks, and emphasis.

Every chunk is one 77-position sequence (start token, the chunk, end token, padding) of the
encoders' batch. Which layer's states a sequence gets is its row's `clip_skip`, in A1111's
numbering (1 is the last layer; diffusers' `clip_skip=k` is A1111's k + 1):

- SD 1.x/2.x: 1 is CLIP's last hidden state; n > 1 is `hidden_states[-n]` through the final
  layer norm, as A1111 and diffusers' `StableDiffusionPipeline.encode_prompt` take it.
- SDXL (and its refiner): 1 is what SDXL reads anyway, each encoder's penultimate state
  (`hidden_states[-2]`, no final norm); n > 1 is `hidden_states[-(n + 1)]` of both, which is
  diffusers' `clip_skip=n-1` in `StableDiffusionXLPipeline`. A1111 ignores clip skip on SDXL
  unless its `sdxl_clip_l_skip` option is on, which then counts from the last layer and for
  CLIP-L alone; sdfarm follows diffusers, so that `clip_skip` means the same on both families.

Emphasis is A1111's default, "Original" (`modules/sd_emphasis.py`): for each sequence,
`z *= weights`, one weight per position (1 for the start, end and padding), then `z` is scaled
back to its mean before the multiply. A1111 takes that mean over its whole batch of prompts;
sdfarm over each sequence alone, so a row's states do not depend on its batch-mates (the same
as A1111's at batch size 1). SDXL: each encoder's states get their own, before they are
concatenated, since A1111 wraps each of SDXL's two encoders on its own; the pooled embedding is
left as it is, as in A1111. A sequence whose weights are all 1 is not touched at all, so its
states are bit for bit those of plain text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from shared.errors import InvalidJob
from worker.models import LoadedModel
from worker.prompt_chunks import Chunk

__all__ = ["encode_chunks"]


def encode_chunks(
    model: LoadedModel, chunks: Sequence[Chunk], clip_skips: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each chunk's states, (chunks, 77, hidden), and SDXL's pooled ones, (chunks, projection).

    SD 1.x/2.x: CLIP's states at the chunk's clip skip. SDXL: both encoders' states side by
    side, and the second encoder's projection (of its last layer, whatever the clip skip).
    """
    _check_clip_skips(model, clip_skips)
    hidden = any(skip > 1 for skip in clip_skips)
    encoder = model.text_encoder
    if model.text_encoder_2 is None or model.tokenizer_2 is None:
        assert encoder is not None  # only an SDXL refiner lacks the first encoder
        output = encoder(
            *_inputs(model, model.tokenizer, encoder, chunks), output_hidden_states=hidden
        )
        states = _normed_layers(output, encoder, clip_skips) if hidden else output[0]
        return _emphasised(states, chunks).to(dtype=model.dtype), None
    parts = []
    if encoder is not None:  # not for an SDXL refiner, which reads the second encoder alone
        first = encoder(
            *_inputs(model, model.tokenizer, encoder, chunks), output_hidden_states=True
        )
        parts.append(_emphasised(_sdxl_layers(first, clip_skips), chunks))
    second = model.text_encoder_2(
        *_inputs(model, model.tokenizer_2, model.text_encoder_2, chunks),
        output_hidden_states=True,
    )
    parts.append(_emphasised(_sdxl_layers(second, clip_skips), chunks))
    joined = torch.cat(parts, dim=-1)
    pooled = _projected(model.text_encoder_2, second.last_hidden_state, chunks)
    return joined.to(dtype=model.dtype), pooled.to(dtype=model.dtype)


def _check_clip_skips(model: LoadedModel, clip_skips: Sequence[int]) -> None:
    """Refuse a clip skip past the encoder's first layer (only a tiny test model has so few)."""
    encoders = [e for e in (model.text_encoder, model.text_encoder_2) if e is not None]
    layers = min(e.config.num_hidden_layers for e in encoders)
    # SD 1.x counts from the last layer, SDXL from the penultimate one.
    most = layers - 1 if model.text_encoder_2 is not None else layers
    if clip_skips and max(clip_skips) > most:
        raise InvalidJob(
            f"`clip_skip` has to be at most {most} for {model.name}, whose text encoder has "
            f"{layers} layers, but is {max(clip_skips)}"
        )


def _normed_layers(output: Any, encoder: Any, clip_skips: Sequence[int]) -> torch.Tensor:
    """SD 1.x/2.x: each sequence's `hidden_states[-n]` through the final layer norm, or the last
    hidden state (which is that of the last layer) where n is 1."""
    states: torch.Tensor = output.last_hidden_state.clone()
    # transformers 5 holds the norm on CLIPTextModel itself, 4 on its `text_model`
    norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
    for skip in sorted(set(clip_skips) - {1}):
        rows = [i for i, s in enumerate(clip_skips) if s == skip]
        states[rows] = norm(output.hidden_states[-skip][rows])
    return states


def _sdxl_layers(output: Any, clip_skips: Sequence[int]) -> torch.Tensor:
    """SDXL: each sequence's `hidden_states[-(n + 1)]`, the penultimate layer where n is 1."""
    states: torch.Tensor = output.hidden_states[-2]
    if all(skip == 1 for skip in clip_skips):
        return states
    states = states.clone()
    for skip in sorted(set(clip_skips) - {1}):
        rows = [i for i, s in enumerate(clip_skips) if s == skip]
        states[rows] = output.hidden_states[-(skip + 1)][rows]
    return states


_MEAN_FLOOR = 1e-3  # of the states' mean magnitude: below it the mean is not restored


def _emphasised(states: torch.Tensor, chunks: Sequence[Chunk]) -> torch.Tensor:
    """A1111's "Original" emphasis, a sequence at a time, in float32; untouched where plain."""
    if all(chunk.plain for chunk in chunks):
        return states
    out = []
    for z, chunk in zip(states, chunks, strict=True):
        if chunk.plain:
            out.append(z)
            continue
        weights = torch.ones(z.shape[0], dtype=torch.float32, device=z.device)
        weights[1 : 1 + len(chunk.weights)] = torch.tensor(chunk.weights, dtype=torch.float32)
        original = z.float()
        weighted = original * weights[:, None]
        mean = weighted.mean()
        # Restoring a mean next to zero (states averaging ~0, as the tiny test models' do) would
        # divide rounding noise by rounding noise: A1111 gives NaN there; the weights alone apply.
        if mean.abs() > _MEAN_FLOOR * weighted.abs().mean():
            weighted = weighted * (original.mean() / mean)
        out.append(weighted.to(dtype=z.dtype))
    return torch.stack(out)


def _projected(
    encoder: Any, last_hidden_state: torch.Tensor, chunks: Sequence[Chunk]
) -> torch.Tensor:
    """The second encoder's pooled embedding (its final state at each end token, projected),
    one sequence at a time: a batched projection rounds differently from one of a single row, and
    a row's conditioning must not depend on its batch-mates (nor differ from diffusers', which
    projects each prompt alone)."""
    ends = [len(chunk.ids) + 1 for chunk in chunks]  # the start token, the chunk, then the end
    return torch.cat(
        [encoder.text_projection(last_hidden_state[i : i + 1, end]) for i, end in enumerate(ends)]
    )


def _inputs(
    model: LoadedModel, tokenizer: Any, encoder: Any, chunks: Sequence[Chunk]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder's input ids for the chunks, padded to 77, and its attention mask if any."""
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    masks = []
    for chunk in chunks:
        ids = [tokenizer.bos_token_id, *chunk.ids, tokenizer.eos_token_id]
        rows.append(ids + [pad] * (length - len(ids)))
        masks.append([1] * len(ids) + [0] * (length - len(ids)))
    input_ids = torch.tensor(rows, dtype=torch.long, device=model.device)
    # SD's U-Net was trained on CLIP states computed without an attention mask, padding included;
    # as in diffusers, only a text encoder whose config asks for a mask gets one.
    attention_mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        attention_mask = torch.tensor(masks, dtype=torch.long, device=model.device)
    return input_ids, attention_mask
