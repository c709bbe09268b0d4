"""A model's family and native size, read from the small JSON files of a diffusers folder.

The worker reads them from the loaded model; the API reads them from the folder (no torch, no
weights), when it can reach the same path the workers use, so that a job that names no size gets
its model's: SD 1.x 512x512, SD 2.x 768x768 (v-prediction) or 512x512 (base), SDXL 1024x1024;
the native size is the U-Net's `sample_size` times the VAE's downsampling, as diffusers' own
pipelines default to it, so the tiny test models (64x64) follow the same rule. A single-file
`.safetensors` checkpoint answers from the key names in its header (shared/checkpoint_keys.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.checkpoint_keys import (
    CHECKPOINT_NATIVE_PX,
    checkpoint_family,
    safetensors_keys,
    sd2_is_v_prediction,
)

__all__ = [
    "FAMILIES",
    "ModelFacts",
    "family_of",
    "model_facts",
    "native_sizes",
    "read_model_facts",
]

log = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")


@dataclass(frozen=True)
class ModelFacts:
    """What a model is, without loading it."""

    family: str
    native_px: int  # the side of the square it was trained at


def family_of(
    unet_config: Mapping[str, Any], *, second_text_encoder: bool, first_text_encoder: bool = True
) -> str:
    """SDXL base (two text encoders, `text_time` conditioning), SDXL refiner (`text_time`, only
    the second, OpenCLIP bigG, encoder), SD 2.x (1024-wide OpenCLIP cross-attention) or SD 1.x."""
    if second_text_encoder and unet_config.get("addition_embed_type") == "text_time":
        return "sdxl" if first_text_encoder else "sdxl-refiner"
    return "sd2" if unet_config.get("cross_attention_dim") == 1024 else "sd1"


def read_model_facts(path: str) -> ModelFacts | None:
    """The family and native size of the diffusers folder or single `.safetensors` file at `path`;
    None when it cannot be read here (a `.ckpt`, a pickle not opened here; a hub id; a path only
    the workers have)."""
    root = Path(path)
    if root.suffix == ".safetensors" and root.is_file():
        return _single_file_facts(root)
    try:
        unet = json.loads((root / "unet" / "config.json").read_text())
        vae = json.loads((root / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    downsampling = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample = unet.get("sample_size")
    if not isinstance(sample, int):
        return None
    family = family_of(
        unet,
        second_text_encoder=(root / "text_encoder_2").is_dir(),
        first_text_encoder=(root / "text_encoder").is_dir(),
    )
    return ModelFacts(family=family, native_px=sample * downsampling)


def _single_file_facts(path: Path) -> ModelFacts | None:
    """As worker/checkpoints.py reads the file: from the configs beside it, else by its keys."""
    beside = path.with_suffix(".config")
    if beside.is_dir():
        return read_model_facts(str(beside))
    keys = safetensors_keys(path)
    family = checkpoint_family(keys) if keys is not None else None
    if family is None:
        return None
    if family == "sd2" and not sd2_is_v_prediction(path):
        return ModelFacts(family=family, native_px=512)
    return ModelFacts(family=family, native_px=CHECKPOINT_NATIVE_PX[family])


def model_facts(models: Mapping[str, str]) -> dict[str, ModelFacts]:
    """The facts of the configured models whose folders can be read here, by model name."""
    out = {}
    for name, path in models.items():
        facts = read_model_facts(path)
        if facts is None:
            log.info(
                "model %s: %s is not readable here; jobs without a size get 512x512", name, path
            )
            continue
        out[name] = facts
    return out


def native_sizes(models: Mapping[str, str]) -> dict[str, int]:
    """Native sizes of the configured models whose folders can be read here, by model name."""
    return {name: facts.native_px for name, facts in model_facts(models).items()}
