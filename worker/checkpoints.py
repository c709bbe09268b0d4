"""Single-file checkpoints (A1111's, ComfyUI's `.safetensors`/`.ckpt`) of SD 1.x/2.x and SDXL.

A single file holds weights in the original key layout (LDM's for SD 1.x/2.x, SGM's for SDXL:
shared/checkpoint_keys.py) and no configuration; nothing may be fetched at run time, so the
configuration comes from, in this order:

1. `<file without its suffix>.config/` beside the checkpoint: a diffusers model folder without
   weights (model_index.json, unet/config.json, ...), for a checkpoint of another architecture
   (`sdfarm model make-tiny DIR --single-file FILE` writes one for the tiny models);
2. the configs shipped in worker/configs/, picked by the text encoder(s) the file holds: SD 1.x
   (CLIP ViT-L, `sd1/`); SD 2.x (OpenCLIP ViT-H: `sd2-v/`, the 768 v-prediction model, unless an
   A1111-style `<file without its suffix>.yaml` beside it lacks `parameterization: "v"`, which
   makes it `sd2-base/`, the 512 epsilon model); SDXL 1.0 base (CLIP ViT-L and OpenCLIP
   ViT-bigG, `sdxl/`); SDXL 1.0 refiner (ViT-bigG alone, `sdxl-refiner/`).

The weights are converted with diffusers' own single-file converters; model_index.json's flags
(`force_zeros_for_empty_prompt`, `requires_aesthetics_score`) come from the config folder. CLIP's
tokenizer files (vocab.json, merges.txt, 1.6 MB) are not shipped: they are read from the config
folder's tokenizer/ (for SDXL's second tokenizer, tokenizer_2/ first: the same vocabulary, padded
with "!"), else from a `tokenizer/` folder beside the checkpoint; the error says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from shared.checkpoint_keys import (
    SD1_TEXT,
    SD2_TEXT,
    SDXL_REFINER_TEXT,
    SDXL_TEXT,
    SDXL_TEXT_2,
    SGM_EMBEDDERS,
    checkpoint_family,
    sd2_is_v_prediction,
)
from shared.errors import ModelLoadError

__all__ = ["CHECKPOINT_SUFFIXES", "SHIPPED_CONFIGS", "SingleFile", "load_single_file"]

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
SHIPPED_CONFIGS = Path(__file__).parent / "configs"
# The config folder's sub-folders each family reads, past unet/, vae/ and scheduler/.
_TEXT_FOLDERS = {
    "sd1": ("tokenizer", "text_encoder"),
    "sd2": ("tokenizer", "text_encoder"),
    "sdxl": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
    "sdxl-refiner": ("tokenizer_2", "text_encoder_2"),
}


@dataclass
class SingleFile:
    """The components of a single-file checkpoint, on the CPU in float32."""

    tokenizer: CLIPTokenizer | None  # None for an SDXL refiner, which has only the second
    text_encoder: CLIPTextModel | None
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    config_dir: Path
    family: str  # one of shared.families.FAMILIES
    # SDXL: the second tokenizer and text encoder (OpenCLIP bigG with projection); else None.
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    # The config folder's model_index.json flags (True and False for SDXL base; the reverse
    # for the refiner).
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False


def _family(path: Path, keys: list[str]) -> str:
    family = checkpoint_family(keys)
    if family is not None:
        return family
    if _holds(keys, SGM_EMBEDDERS):
        lacks = [f"`{p}*`" for p in (SDXL_TEXT, SDXL_TEXT_2) if not _holds(keys, p)]
        raise ModelLoadError(
            f"{path} is an SDXL-layout (SGM) checkpoint without all of its text encoders: it lacks "
            f"{' and '.join(lacks)}; SDXL base holds `{SDXL_TEXT}*` (CLIP ViT-L) and "
            f"`{SDXL_TEXT_2}*` (OpenCLIP ViT-bigG), the refiner only `{SDXL_REFINER_TEXT}*`"
        )
    raise ModelLoadError(
        f"{path} holds no SD 1.x (`{SD1_TEXT}*`), SD 2.x (`{SD2_TEXT}*`) or SDXL "
        f"(`{SGM_EMBEDDERS}*`) text encoder"
    )


def _holds(keys: list[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def _config_dir(path: Path, family: str) -> Path:
    beside = path.with_suffix(".config")
    if beside.is_dir():
        return beside
    if family == "sd2":
        if sd2_is_v_prediction(path):
            log.info("%s: SD 2.x text encoder; taken as the 768 v-prediction model", path.name)
            return SHIPPED_CONFIGS / "sd2-v"
        return SHIPPED_CONFIGS / "sd2-base"
    return SHIPPED_CONFIGS / family


def _tokenizer(path: Path, config_dir: Path, name: str) -> CLIPTokenizer:
    settings = json.loads((config_dir / name / "tokenizer_config.json").read_text())
    places = list(dict.fromkeys([config_dir / name, config_dir / "tokenizer"]))
    places.append(path.parent / "tokenizer")
    for place in places:
        if (place / "vocab.json").is_file() and (place / "merges.txt").is_file():
            # The model's own settings (SD 2.x and SDXL's second pad with "!") over the folder's.
            keep = {k: v for k, v in settings.items() if k != "tokenizer_class"}
            tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(
                place, local_files_only=True, **keep
            )
            return tokenizer
    raise ModelLoadError(
        f"{path.name}: CLIP's tokenizer files (vocab.json and merges.txt) are not here and cannot "
        f"be downloaded; copy them from any SD 1.x/2.x or SDXL diffusers folder's tokenizer/ "
        f"(they are the same for all) into {places[-1]}/ (or {places[0]}/)"
    )


def _text_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); the converters keep it.
    if hasattr(module, "text_model"):
        return state
    return {key.removeprefix("text_model."): value for key, value in state.items()}


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    result = module.load_state_dict(state, strict=False)
    # CLIP's position ids are a constant that real checkpoints carry and transformers rebuilds.
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path.name}: its {what} does not match the configuration: "
            f"{len(missing)} missing keys (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]})"
        )


def _text_config(config_dir: Path, name: str) -> CLIPTextConfig:
    config: CLIPTextConfig = CLIPTextConfig.from_pretrained(
        config_dir / name, local_files_only=True
    )
    return config


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
    family = _family(path, list(checkpoint))
    config_dir = _config_dir(path, family)
    log.info("%s: %s, configuration from %s", path.name, family, config_dir)
    absent = [f"{name}/" for name in _TEXT_FOLDERS[family] if not (config_dir / name).is_dir()]
    if absent:
        raise ModelLoadError(
            f"{path.name}: its {family} text encoders need {', '.join(absent)} in {config_dir}"
        )

    # The tokenizers first: their files are the part most often missing.
    tokenizer = _tokenizer(path, config_dir, "tokenizer") if family != "sdxl-refiner" else None
    tokenizer_2 = _tokenizer(path, config_dir, "tokenizer_2") if family.startswith("sdxl") else None

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    _load(unet, convert_ldm_unet_checkpoint(checkpoint, unet.config), "U-Net", path)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    _load(vae, convert_ldm_vae_checkpoint(checkpoint, vae.config), "VAE", path)

    text_encoder = None
    if tokenizer is not None:
        text_encoder = CLIPTextModel(_text_config(config_dir, "text_encoder"))
        if family == "sd2":
            text_state = convert_open_clip_checkpoint(text_encoder, checkpoint, prefix=SD2_TEXT)
            text_state.pop("text_projection.weight", None)  # CLIPTextModel has no projection
        else:
            prefix = SDXL_TEXT if family == "sdxl" else SD1_TEXT
            text_state = convert_ldm_clip_checkpoint(checkpoint, remove_prefix=prefix)
        _load(text_encoder, _text_state(text_encoder, text_state), "text encoder", path)

    text_encoder_2 = None
    if tokenizer_2 is not None:
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(config_dir, "text_encoder_2"))
        prefix = SDXL_TEXT_2 if family == "sdxl" else SDXL_REFINER_TEXT
        # The projection (the pooled embedding) comes along: `<prefix>text_projection`.
        text_state = convert_open_clip_checkpoint(text_encoder_2, checkpoint, prefix=prefix)
        _load(text_encoder_2, _text_state(text_encoder_2, text_state), "second text encoder", path)

    scheduler_config = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
    index_file = config_dir / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    return SingleFile(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler_config=scheduler_config,
        config_dir=config_dir,
        family=family,
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
    )
