"""Writing a diffusers model as one file in the original key layout (A1111's, ComfyUI's).

The inverse of what diffusers' single-file loader reads (worker/checkpoints.py loads with it), in
the way of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and
convert_diffusers_to_original_sdxl.py, but with the number of layers per block read from the
model's config instead of assumed to be SD's 2, so that the tiny test models can be written as
single-file checkpoints too (the transformer depth of each block needs nothing: its layers keep
their diffusers names). SD 1.x is written in LDM's layout, its text encoder under
`cond_stage_model.transformer.`; SDXL base and refiner in SGM's, the U-Net's `text_time`
embedding as `label_emb.0.*` and the text encoders under `conditioner.embedders.N.` (CLIP ViT-L
in Hugging Face's layout, OpenCLIP ViT-bigG in OpenCLIP's). SD 2.x's OpenCLIP ViT-H is not written.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from shared.checkpoint_keys import SD1_TEXT, SDXL_REFINER_TEXT, SDXL_TEXT, SDXL_TEXT_2

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
    # SDXL's `text_time` conditioning (pooled text embedding, sizes and crop): a 2-layer MLP.
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
]
_VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v.")]
# A Hugging Face CLIP layer's parts, by their OpenCLIP names (its attention's q, k, v are fused).
_OPEN_CLIP_LAYER = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
]


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


def _clip_state(encoder: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP ViT-L as LDM and SGM keep it: Hugging Face's names, under `text_model.`, with the
    position ids that real checkpoints carry (a buffer that transformers no longer saves)."""
    positions = torch.arange(encoder.config.max_position_embeddings)[None]
    out = {prefix + "text_model.embeddings.position_ids": positions}
    for key, value in encoder.state_dict().items():
        # transformers >= 5.6 names CLIPTextModel's parameters without `text_model.`
        out[prefix + "text_model." + key.removeprefix("text_model.")] = value
    return out


def _open_clip_state(encoder: CLIPTextModelWithProjection, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder with projection in OpenCLIP's layout, as SGM keeps SDXL's ViT-bigG."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    state.pop("embeddings.position_ids", None)  # a buffer in older transformers
    out = {
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        # OpenCLIP multiplies by it (x @ P), a Linear by its transpose.
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
        # CLIP's similarity temperature, kept by SGM with the rest of the model; nothing reads it.
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for i in range(encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            fused = [state.pop(f"{layer}self_attn.{q}_proj.{kind}") for q in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(fused)
            for hf, open_clip in _OPEN_CLIP_LAYER:
                out[block + open_clip + kind] = state.pop(layer + hf + kind)
    if state:
        raise ValueError(f"no OpenCLIP name for {sorted(state)[:3]}")
    return {prefix + key: value for key, value in out.items()}


def _text_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The model's text encoder(s): LDM's for SD 1.x, SGM's conditioner for SDXL (base, refiner)."""
    if not (model_dir / "text_encoder_2").is_dir():
        return _clip_state(CLIPTextModel.from_pretrained(model_dir / "text_encoder"), SD1_TEXT)
    second = CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder_2")
    if not (model_dir / "text_encoder").is_dir():  # the refiner: ViT-bigG alone, first
        return _open_clip_state(second, SDXL_REFINER_TEXT)
    first = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    return _clip_state(first, SDXL_TEXT) | _open_clip_state(second, SDXL_TEXT_2)


def write_single_file(model_dir: Path, out: Path) -> Path:
    """Write the diffusers SD 1.x or SDXL (base or refiner) model at `model_dir` as one
    `.safetensors` file at `out`, in the original layout (LDM's; SGM's for SDXL).

    Beside it, `<out minus suffix>.config/` receives the folder's configs and tokenizer (no
    weights): worker/checkpoints.py reads a model's configuration from there when present.
    """
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    state = _unet_state(unet) | _vae_state(vae) | _text_state(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out)
    config_dir = out.with_suffix(".config")
    shutil.rmtree(config_dir, ignore_errors=True)
    shutil.copytree(model_dir, config_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    index = json.loads((config_dir / "model_index.json").read_text())
    log.info("wrote %s (%d tensors, %s) and its configs", out, len(state), index["_class_name"])
    return out
