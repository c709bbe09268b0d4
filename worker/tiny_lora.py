"""Random LoRAs for the tiny models (`sdfarm model make-tiny-lora`), in the two layouts that load.

- `diffusers` (PEFT): `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>...`
  (`text_encoder_2.` for SDXL's second), as `save_lora_weights` writes them; no alphas, so
  diffusers scales by 1.
- `kohya` (A1111's): `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  text encoders `lora_te_` (SDXL: `lora_te1_`, `lora_te2_`), and `ss_base_model_version` in the
  metadata, as kohya's trainer writes. Its alpha is half the rank, so it scales by 0.5, as many
  real LoRAs do, which the loaders must honour.

Each LoRA adapts every attention projection of the U-Net (self and cross) and of the text
encoder(s), strongly enough that an image with it differs from one without by tens of levels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from worker.model_files import quiet_hf_progress_bars

__all__ = ["LAYOUTS", "make_tiny_lora"]

log = logging.getLogger(__name__)

LAYOUTS = ("diffusers", "kohya")
_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_KOHYA_VERSION = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def _targets(module: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    return {
        name: sub
        for name, sub in module.named_modules()
        if isinstance(sub, torch.nn.Linear) and name.endswith(suffixes)
    }


def _pair(layer: torch.nn.Linear, rank: int, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up): down (rank, in), up (out, rank), so that up @ down is `strength` times the
    size of the layer's own weights."""
    out_features, in_features = layer.weight.shape
    down = torch.randn(rank, in_features) / in_features**0.5
    up = torch.randn(out_features, rank) * layer.weight.std() * strength / rank**0.5
    return down, up


def make_tiny_lora(
    model_dir: Path,
    out: Path,
    *,
    layout: str = "diffusers",
    seed: int = 0,
    rank: int = 4,
    strength: float = 2.0,
) -> Path:
    """Write a random LoRA for the tiny model at `model_dir` to the file `out`; returns `out`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    with quiet_hf_progress_bars():
        encoders: dict[str, torch.nn.Module] = {
            name: cls.from_pretrained(model_dir / name)
            for name, cls in (
                ("text_encoder", CLIPTextModel),
                ("text_encoder_2", CLIPTextModelWithProjection),
            )
            if (model_dir / name).is_dir()
        }
    sdxl = "text_encoder_2" in encoders
    parts: list[tuple[str, str, torch.nn.Module, tuple[str, ...]]] = [
        ("unet", "lora_unet", unet, _UNET_TARGETS)
    ]
    for name, encoder in encoders.items():
        kohya = "lora_te2" if name == "text_encoder_2" else ("lora_te1" if sdxl else "lora_te")
        parts.append((name, kohya, encoder, _TEXT_TARGETS))
    tensors: dict[str, torch.Tensor] = {}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for prefix, kohya_prefix, module, suffixes in parts:
            for name, layer in sorted(_targets(module, suffixes).items()):
                down, up = _pair(layer, rank, strength)
                if layout == "diffusers":
                    tensors[f"{prefix}.{name}.lora_A.weight"] = down
                    tensors[f"{prefix}.{name}.lora_B.weight"] = up
                else:
                    key = f"{kohya_prefix}_{name.replace('.', '_')}"
                    tensors[f"{key}.lora_down.weight"] = down
                    tensors[f"{key}.lora_up.weight"] = up * 2  # alpha = rank / 2 halves it back
                    tensors[f"{key}.alpha"] = torch.tensor(rank / 2)
    finally:
        torch.random.set_rng_state(generator_state)
    metadata = {"ss_base_model_version": _KOHYA_VERSION["sdxl" if sdxl else "sd1"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    save_file(tensors, str(out), metadata=metadata if layout == "kohya" else None)
    log.info("wrote a tiny %s LoRA (seed %d, %d tensors) to %s", layout, seed, len(tensors), out)
    return out
