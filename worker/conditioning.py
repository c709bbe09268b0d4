"""SDXL's additional conditioning (`added_cond_kwargs`), per row of a pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.models import LoadedModel
from worker.pass_spec import PassParams, Row
from worker.prompts import EncodedRow

__all__ = ["added_conditioning"]


def added_conditioning(
    model: LoadedModel, rows: Sequence[Row], encoded: Sequence[EncodedRow], params: PassParams
) -> dict[str, torch.Tensor] | None:
    """SDXL's `text_time` conditioning, laid out as the U-Net batch ([uncond rows, cond rows]):
    each row's pooled embedding, and its six size numbers (original size, crop top-left, target
    size), the negative half with the same numbers as its row, as diffusers does by default. The
    refiner's five numbers end with the aesthetic score instead of the target size, the negative
    half with the negative score."""
    if not model.family.startswith("sdxl"):
        return None
    pooled = [e.pooled_uncond for e in encoded] + [e.pooled_cond for e in encoded]
    text_embeds = torch.cat([p for p in pooled if p is not None])
    target = (params.height, params.width)
    sizes: list[list[float]] = [
        [*(row.original_size or target), *row.crop_top_left] for row in rows
    ]
    if model.requires_aesthetics_score:
        pairs = list(zip(sizes, rows, strict=True))
        numbers: list[list[float]] = [[*size, row.negative_aesthetic_score] for size, row in pairs]
        numbers += [[*size, row.aesthetic_score] for size, row in pairs]
    else:
        numbers = [[*size, *target] for size in sizes] * 2
    time_ids = torch.tensor(numbers, dtype=text_embeds.dtype)
    return {"text_embeds": text_embeds, "time_ids": time_ids.to(model.device)}
