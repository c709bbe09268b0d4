"""Single-file SD 1.x/2.x checkpoints (A1111's, ComfyUI's `.safetensors`/`.ckpt`), loaded offline.

A single file holds weights in the original LDM key layout and no configuration; nothing may be
fetched at run time, so the configuration comes from, in this order:

1. `<file without its suffix>.config/` beside the checkpoint: a diffusers model folder without
   weights (model_index.json, unet/config.json, ...), for a checkpoint of another architecture
   (`sdfarm model export` writes one for the tiny model);
2. the configs shipped in worker/configs/, picked by the text encoder the file holds: SD 1.x
   (CLIP ViT-L, `sd1/`) or SD 2.x (OpenCLIP ViT-H: `sd2-v/`, the 768 v-prediction model, unless an
   A1111-style `<file without its suffix>.yaml` beside it lacks `parameterization: "v"`, which
   makes it `sd2-base/`, the 512 epsilon model).

The weights are converted with diffusers' own single-file converters. CLIP's tokenizer files
(vocab.json, merges.txt, 1.6 MB) are not shipped: they are read from the config folder's
tokenizer/, else from a `tokenizer/` folder beside the checkpoint; the error says so.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from shared.errors import ModelLoadError

__all__ = ["CHECKPOINT_SUFFIXES", "SHIPPED_CONFIGS", "SingleFile", "load_single_file"]

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
SHIPPED_CONFIGS = Path(__file__).parent / "configs"
_SD1_TEXT = "cond_stage_model.transformer."
_SD2_TEXT = "cond_stage_model.model."
_V_PARAMETERIZATION = re.compile(r"""^\s*parameterization:\s*["']?v["']?\s*$""", re.MULTILINE)


@dataclass
class SingleFile:
    """The components of a single-file checkpoint, on the CPU in float32."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    config_dir: Path


def _config_dir(path: Path, checkpoint: dict[str, torch.Tensor]) -> Path:
    beside = path.with_suffix(".config")
    if beside.is_dir():
        return beside
    if any(key.startswith(_SD1_TEXT) for key in checkpoint):
        return SHIPPED_CONFIGS / "sd1"
    if any(key.startswith(_SD2_TEXT) for key in checkpoint):
        yaml = path.with_suffix(".yaml")
        if yaml.is_file() and not _V_PARAMETERIZATION.search(yaml.read_text(errors="replace")):
            return SHIPPED_CONFIGS / "sd2-base"
        log.info("%s: SD 2.x text encoder; taken as the 768 v-prediction model", path.name)
        return SHIPPED_CONFIGS / "sd2-v"
    raise ModelLoadError(
        f"{path} holds no SD 1.x (`{_SD1_TEXT}*`) or SD 2.x (`{_SD2_TEXT}*`) text encoder; "
        f"for another architecture put its diffusers configs in {beside}/"
    )


def _tokenizer(path: Path, config_dir: Path) -> CLIPTokenizer:
    settings = json.loads((config_dir / "tokenizer" / "tokenizer_config.json").read_text())
    places = [config_dir / "tokenizer", path.parent / "tokenizer"]
    for place in places:
        if (place / "vocab.json").is_file() and (place / "merges.txt").is_file():
            # The model's own settings (SD 2.x pads with "!") over what the folder says.
            keep = {k: v for k, v in settings.items() if k != "tokenizer_class"}
            tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(
                place, local_files_only=True, **keep
            )
            return tokenizer
    raise ModelLoadError(
        f"{path.name}: CLIP's tokenizer files (vocab.json and merges.txt) are not here and cannot "
        f"be downloaded; copy them from any SD 1.x/2.x diffusers folder's tokenizer/ (they are "
        f"the same for both) into {places[1]}/ (or {places[0]}/)"
    )


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"{path.name}: its {what} does not match the configuration: "
            f"{len(missing)} missing keys (first: {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (first: {result.unexpected_keys[:3]})"
        )


def load_single_file(path: Path) -> SingleFile:
    """Read and convert the checkpoint at `path`; raise ModelLoadError saying what is wrong."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        load_single_file_checkpoint,
    )

    checkpoint: dict[str, torch.Tensor] = load_single_file_checkpoint(
        str(path), local_files_only=True
    )
    config_dir = _config_dir(path, checkpoint)
    log.info("%s: configuration from %s", path.name, config_dir)
    tokenizer = _tokenizer(path, config_dir)

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    _load(unet, convert_ldm_unet_checkpoint(checkpoint, unet.config), "U-Net", path)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    _load(vae, convert_ldm_vae_checkpoint(checkpoint, vae.config), "VAE", path)
    text_config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
    text_encoder = CLIPTextModel(text_config)
    if any(key.startswith(_SD2_TEXT) for key in checkpoint):
        text_state = convert_open_clip_checkpoint(text_encoder, checkpoint)
        text_state.pop("text_projection.weight", None)  # CLIPTextModel has no projection
    else:
        text_state = convert_ldm_clip_checkpoint(checkpoint)
    _load(text_encoder, text_state, "text encoder", path)
    scheduler_config = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
    return SingleFile(tokenizer, text_encoder, unet, vae, scheduler_config, config_dir)
