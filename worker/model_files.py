"""Reading a model's components from a diffusers folder or a single-file checkpoint, on the CPU.

`worker.models.load_model` places what is read here on its device; an SDXL refiner's folder has
the second tokenizer and text encoder in place of the first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as hf_logging

from shared.errors import ModelLoadError
from worker.checkpoints import CHECKPOINT_SUFFIXES, load_single_file

__all__ = [
    "COMPONENTS",
    "REFINER_COMPONENTS",
    "Parts",
    "check_folder",
    "quiet_hf_progress_bars",
    "read_folder",
    "read_single_file",
]

# The sub-folders of a diffusers Stable Diffusion model that the sampling loop uses; an SDXL
# refiner has the second tokenizer and text encoder in place of the first.
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
REFINER_COMPONENTS = ("tokenizer_2", "text_encoder_2", "unet", "vae", "scheduler")


@contextmanager
def quiet_hf_progress_bars() -> Iterator[None]:
    """Turn off transformers' per-load progress bars, which would clutter worker logs."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def check_folder(name: str, root: Path) -> None:
    if not root.exists():
        raise ModelLoadError(f"model {name!r}: {root} does not exist")
    if not root.is_dir():
        raise ModelLoadError(
            f"model {name!r}: {root} is a file but not a single-file checkpoint "
            f"({' or '.join(CHECKPOINT_SUFFIXES)}); sdfarm loads those and diffusers-format "
            f"model folders (model_index.json with {', '.join(COMPONENTS)} sub-folders)"
        )
    wanted = COMPONENTS if (root / "text_encoder").is_dir() else REFINER_COMPONENTS
    missing = [c for c in wanted if not (root / c).is_dir()]
    if missing and wanted is REFINER_COMPONENTS and (root / "tokenizer").is_dir():
        missing = [c for c in COMPONENTS if not (root / c).is_dir()]  # a broken SD folder
    if missing:
        raise ModelLoadError(
            f"model {name!r}: {root} is not a diffusers Stable Diffusion folder; "
            f"missing sub-folder(s): {', '.join(missing)}"
        )


def _load_folder(
    root: Path, dtype: torch.dtype
) -> tuple[
    CLIPTokenizer | None, CLIPTextModel | None, UNet2DConditionModel, AutoencoderKL, dict[str, Any]
]:
    """A diffusers folder's tokenizer, text encoder, U-Net, VAE and scheduler config (no first
    tokenizer and text encoder for an SDXL refiner)."""
    component = "scheduler"
    tokenizer, text_encoder = None, None
    try:
        scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        component = "tokenizer"
        if (root / "text_encoder").is_dir():
            tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        with quiet_hf_progress_bars():
            component = "text_encoder"
            if tokenizer is not None:
                text_encoder = CLIPTextModel.from_pretrained(
                    root / "text_encoder", dtype=dtype, local_files_only=True
                )
            component = "unet"
            unet = UNet2DConditionModel.from_pretrained(
                root / "unet", torch_dtype=dtype, local_files_only=True
            )
            component = "vae"
            vae = AutoencoderKL.from_pretrained(
                root / "vae", torch_dtype=dtype, local_files_only=True
            )
    except Exception as e:  # wrapped, not swallowed: the worker must say which part failed
        raise ModelLoadError(f"cannot load {component} from {root}: {e}") from e
    return tokenizer, text_encoder, unet, vae, scheduler_config


def _load_second_encoder(
    root: Path, dtype: torch.dtype
) -> tuple[CLIPTokenizer, CLIPTextModelWithProjection] | None:
    """SDXL's second tokenizer and text encoder, when the folder has them."""
    if not (root / "text_encoder_2").is_dir():
        return None
    component = "tokenizer_2"
    try:
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)
        component = "text_encoder_2"
        with quiet_hf_progress_bars():
            encoder = CLIPTextModelWithProjection.from_pretrained(
                root / "text_encoder_2", dtype=dtype, local_files_only=True
            )
    except Exception as e:  # wrapped, not swallowed: the worker must say which part failed
        raise ModelLoadError(f"cannot load {component} from {root}: {e}") from e
    return tokenizer, encoder


def _index_flag(root: Path, key: str) -> bool:
    """A pipeline flag of model_index.json (`force_zeros_for_empty_prompt`...), False if absent."""
    index = root / "model_index.json"
    if not index.is_file():
        return False
    return bool(json.loads(index.read_text()).get(key, False))


@dataclass
class Parts:
    """A model's components as read, before they are placed on the device."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel | None
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    second: tuple[CLIPTokenizer, CLIPTextModelWithProjection] | None  # SDXL's OpenCLIP bigG
    force_zeros_for_empty_prompt: bool
    requires_aesthetics_score: bool

    def modules(self) -> list[torch.nn.Module]:
        found = [self.unet, self.vae, self.text_encoder, self.second and self.second[1]]
        return [m for m in found if isinstance(m, torch.nn.Module)]


def read_single_file(root: Path, dtype: torch.dtype) -> Parts:
    parts = load_single_file(root)
    second = None
    if parts.tokenizer_2 is not None and parts.text_encoder_2 is not None:
        second = (parts.tokenizer_2, parts.text_encoder_2)
    tokenizer = parts.tokenizer or (second[0] if second else None)
    if tokenizer is None:
        raise ModelLoadError(f"{root} has no text encoder")
    read = Parts(
        tokenizer,
        parts.text_encoder,
        parts.unet,
        parts.vae,
        parts.scheduler_config,
        second,
        parts.force_zeros_for_empty_prompt,
        parts.requires_aesthetics_score,
    )
    for module in read.modules():
        # nn.Module.to, not diffusers' override, which warns about every dtype cast.
        torch.nn.Module.to(module, dtype)
    return read


def read_folder(root: Path, dtype: torch.dtype) -> Parts:
    tokenizer, text_encoder, unet, vae, scheduler_config = _load_folder(root, dtype)
    second = _load_second_encoder(root, dtype)
    tokenizer = tokenizer or (second[0] if second else None)  # a refiner's only one
    if tokenizer is None:
        raise ModelLoadError(f"{root} has no text encoder")
    return Parts(
        tokenizer,
        text_encoder,
        unet,
        vae,
        scheduler_config,
        second,
        _index_flag(root, "force_zeros_for_empty_prompt"),
        _index_flag(root, "requires_aesthetics_score"),
    )
