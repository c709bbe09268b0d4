"""Writing a diffusers model as one file in the original LDM key layout (A1111's, ComfyUI's).

The inverse of what diffusers' single-file loader reads (worker/checkpoints.py loads with it), in
the way of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, but with the
number of layers per block read from the model's config instead of assumed to be SD's 2, so that
the tiny test model can be written as a single-file checkpoint too. SD 1.x text encoders only
(CLIP's layout, `cond_stage_model.transformer.`); SD 2.x's OpenCLIP layout is not written.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

__all__ = ["write_single_file"]

log = logging.getLogger(__name__)

_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
_UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
_VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v.")]


def _unet_prefixes(layers: int, blocks: int, attention_down: list[bool]) -> list[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) for every block of the U-Net; SD's numbering for `layers`."""
    pairs = list(_UNET_TOP)
    for i in range(blocks):
        for j in range(layers):
            ldm = f"input_blocks.{(layers + 1) * i + j + 1}."
            pairs.append((ldm + "0.", f"down_blocks.{i}.resnets.{j}."))
            if attention_down[i]:
                pairs.append((ldm + "1.", f"down_blocks.{i}.attentions.{j}."))
        up_attention = attention_down[blocks - 1 - i]
        for j in range(layers + 1):
            ldm = f"output_blocks.{(layers + 1) * i + j}."
            pairs.append((ldm + "0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attention:
                pairs.append((ldm + "1.", f"up_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            down = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
            pairs.append((down, f"down_blocks.{i}.downsamplers.0.conv."))
            up = f"output_blocks.{(layers + 1) * i + layers}.{2 if up_attention else 1}."
            pairs.append((up, f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]], *, strict: bool = True) -> str:
    for ldm, diffusers_prefix in pairs:
        if key.startswith(diffusers_prefix):
            return ldm + key[len(diffusers_prefix) :]
    if strict:
        raise ValueError(f"no LDM name for {key!r}")
    return key  # named alike in both layouts (the VAE's conv_in, conv_out)


def _unet_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    config = unet.config
    attention_down = ["CrossAttn" in kind for kind in config.down_block_types]
    pairs = _unet_prefixes(config.layers_per_block, len(config.down_block_types), attention_down)
    out = {}
    for key, value in unet.state_dict().items():
        name = _rename(key, pairs)
        if ".resnets." in key:
            for ldm, diffusers_name in _RESNET:
                name = name.replace(diffusers_name, ldm)
        out["model.diffusion_model." + name] = value
    return out


def _vae_state(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    layers = vae.config.layers_per_block
    pairs = [("mid.attn_1.", "mid_block.attentions.0."), ("norm_out.", "conv_norm_out.")]
    pairs += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    for i in range(blocks):
        pairs += [(f"down.{i}.block.{j}.", f"down_blocks.{i}.resnets.{j}.") for j in range(layers)]
        pairs += [
            (f"up.{blocks - 1 - i}.block.{j}.", f"up_blocks.{i}.resnets.{j}.")
            for j in range(layers + 1)
        ]
        if i < blocks - 1:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{blocks - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    out = {}
    for key, value in vae.state_dict().items():
        part, _, rest = key.partition(".")
        if part in {"quant_conv", "post_quant_conv"}:
            out["first_stage_model." + key] = value
            continue
        name = part + "." + _rename(rest, pairs, strict=False)
        name = name.replace("conv_shortcut", "nin_shortcut")
        tensor = value
        if ".attn_1." in name:
            name = name.replace("to_out.0.", "proj_out.")
            for ldm, diffusers_name in _VAE_ATTENTION:
                name = name.replace(".attn_1." + diffusers_name, ".attn_1." + ldm)
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                tensor = value[:, :, None, None]
        out["first_stage_model." + name] = tensor
    return out


def write_single_file(model_dir: Path, out: Path) -> Path:
    """Write the diffusers SD 1.x model at `model_dir` as one LDM `.safetensors` file at `out`.

    Beside it, `<out minus suffix>.config/` receives the folder's configs and tokenizer (no
    weights): worker/checkpoints.py reads a model's configuration from there when present.
    """
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    state = _unet_state(unet) | _vae_state(vae)
    for key, value in text_encoder.state_dict().items():
        state["cond_stage_model.transformer." + key] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out)
    config_dir = out.with_suffix(".config")
    shutil.rmtree(config_dir, ignore_errors=True)
    shutil.copytree(model_dir, config_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    index = json.loads((config_dir / "model_index.json").read_text())
    log.info("wrote %s (%d tensors, %s) and its configs", out, len(state), index["_class_name"])
    return out
