"""What a single-file checkpoint is, told by its key names alone (no torch, no weights).

A1111's and ComfyUI's `.safetensors` files keep the original repositories' key layouts: LDM's for
SD 1.x/2.x (`cond_stage_model.*` for the text encoder), SGM's for SDXL (`conditioner.embedders.N.*`,
one per text encoder). The text encoder(s) a file holds tell its family; worker/checkpoints.py
picks its configuration by them, and shared/families.py its native size, from the file's JSON
header alone (8 bytes of little-endian length, then the JSON), so the API can read it too.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Collection
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_NATIVE_PX",
    "SD1_TEXT",
    "SD2_TEXT",
    "SDXL_REFINER_TEXT",
    "SDXL_TEXT",
    "SDXL_TEXT_2",
    "SGM_EMBEDDERS",
    "checkpoint_family",
    "safetensors_header",
    "safetensors_keys",
    "sd2_is_v_prediction",
]

SD1_TEXT = "cond_stage_model.transformer."  # CLIP ViT-L, Hugging Face's layout
SD2_TEXT = "cond_stage_model.model."  # OpenCLIP ViT-H
SGM_EMBEDDERS = "conditioner.embedders."
SDXL_TEXT = "conditioner.embedders.0.transformer."  # CLIP ViT-L, Hugging Face's layout
SDXL_TEXT_2 = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG, with its projection
SDXL_REFINER_TEXT = "conditioner.embedders.0.model."  # the refiner's only one: ViT-bigG

# The side each family was trained at; an SD 2.x file is the 768 v-prediction model unless an
# A1111-style yaml beside it says otherwise (sd2_is_v_prediction).
CHECKPOINT_NATIVE_PX = {"sd1": 512, "sd2": 768, "sdxl": 1024, "sdxl-refiner": 1024}

_V_PARAMETERIZATION = re.compile(r"""^\s*parameterization:\s*["']?v["']?\s*$""", re.MULTILINE)
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a real SDXL header is under 1 MB


def checkpoint_family(keys: Collection[str]) -> str | None:
    """ "sd1", "sd2", "sdxl" or "sdxl-refiner", by the text encoder(s) among `keys`; None when
    there is none, or only part of SDXL's pair (worker/checkpoints.py says which part)."""

    def holds(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if holds(SGM_EMBEDDERS):
        first, second = holds(SDXL_TEXT), holds(SDXL_TEXT_2)
        if first and second:
            return "sdxl"
        if holds(SDXL_REFINER_TEXT) and not (first or second):
            return "sdxl-refiner"
        return None
    if holds(SD1_TEXT):
        return "sd1"
    return "sd2" if holds(SD2_TEXT) else None


def sd2_is_v_prediction(path: Path) -> bool:
    """An SD 2.x file is the 768 v-prediction model unless `<file minus suffix>.yaml` beside it
    (A1111's way to say) lacks `parameterization: "v"`, which makes it the 512 base model."""
    yaml = path.with_suffix(".yaml")
    return not yaml.is_file() or bool(_V_PARAMETERIZATION.search(yaml.read_text(errors="replace")))


def safetensors_keys(path: Path) -> list[str] | None:
    """The tensor names of the `.safetensors` file at `path`, read from its header alone; None
    when it is not one (unreadable, too short, or a header that is not a JSON object)."""
    header = safetensors_header(path)
    if header is None:
        return None
    return [key for key in header if key != "__metadata__"]


def safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of the `.safetensors` file at `path` (each tensor's dtype, shape and
    offsets, and `__metadata__`); None when it is not one."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None
    return header if isinstance(header, dict) else None
