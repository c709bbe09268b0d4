"""A model's family and native size, read from the small JSON files of a diffusers folder.

The worker reads them from the loaded model; the API reads them from the folder (no torch, no
weights), when it can reach the same path the workers use, so that a job that names no size gets
its model's: SD 1.x 512x512, SD 2.x 768x768 (v-prediction) or 512x512 (base), SDXL 1024x1024;
the native size is the U-Net's `sample_size` times the VAE's downsampling, as diffusers' own
pipelines default to it, so the tiny test models (64x64) follow the same rule.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "ModelFacts", "family_of", "native_sizes", "read_model_facts"]

log = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class ModelFacts:
    """What a model is, without loading it."""

    family: str
    native_px: int  # the side of the square it was trained at


def family_of(unet_config: Mapping[str, Any], *, second_text_encoder: bool) -> str:
    """SDXL base (two text encoders, `text_time` conditioning), SD 2.x (1024-wide OpenCLIP
    cross-attention) or SD 1.x."""
    if second_text_encoder and unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if unet_config.get("cross_attention_dim") == 1024 else "sd1"


def read_model_facts(path: str) -> ModelFacts | None:
    """The family and native size of the diffusers folder at `path`; None when it cannot be read
    here (a single-file checkpoint, a hub id, a path only the workers have)."""
    root = Path(path)
    try:
        unet = json.loads((root / "unet" / "config.json").read_text())
        vae = json.loads((root / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    downsampling = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample = unet.get("sample_size")
    if not isinstance(sample, int):
        return None
    family = family_of(unet, second_text_encoder=(root / "text_encoder_2").is_dir())
    return ModelFacts(family=family, native_px=sample * downsampling)


def native_sizes(models: Mapping[str, str]) -> dict[str, int]:
    """Native sizes of the configured models whose folders can be read here, by model name."""
    out = {}
    for name, path in models.items():
        facts = read_model_facts(path)
        if facts is None:
            log.info(
                "model %s: %s is not readable here; jobs without a size get 512x512", name, path
            )
            continue
        out[name] = facts.native_px
    return out
