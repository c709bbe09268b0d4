"""Stable Diffusion 1.5's architecture from its published configs, with random weights.

No weights can be downloaded where the benchmark runs, and none are needed to time it: the FLOPs,
the memory traffic and so the timings are those of the real model. The configs below are the
values of `runwayml/stable-diffusion-v1-5`'s `unet/`, `vae/` and `text_encoder/` config.json
(CLIP ViT-L/14's text tower); the tokenizer is sdfarm's own small one, which is fine with random
weights since every prompt is padded to CLIP's 77 tokens whatever the vocabulary.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from worker.models import LoadedModel, load_model
from worker.tiny import make_tiny
from worker.tokenizer import BOS_TOKEN, EOS_TOKEN, write_tokenizer

__all__ = ["SCHEDULER_CONFIG", "build_sd15", "build_tiny", "own_tokenizer", "sd15_pipeline"]

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,  # CLIP's: the embedding table is the real model's size
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def own_tokenizer() -> tuple[CLIPTokenizer, dict[str, int]]:
    """sdfarm's own CLIP-style tokenizer (worker/tokenizer.py), and its vocabulary."""
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    write_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    vocab: dict[str, int] = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    return tokenizer, vocab


def build_sd15(device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """SD 1.5's tokenizer, text encoder, U-Net and VAE with random weights, on `device`."""
    tokenizer, vocab = own_tokenizer()
    # Built on the device: initialising 1 B parameters there takes a second, on a CPU a minute.
    with torch.device(device):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **TEXT_CONFIG,
                bos_token_id=vocab[BOS_TOKEN],
                eos_token_id=vocab[EOS_TOKEN],
                pad_token_id=vocab[EOS_TOKEN],
            )
        )
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
    for module in (text_encoder, unet, vae):
        module.to(dtype=dtype)
        module.eval()
        module.requires_grad_(False)
    return LoadedModel(
        name="sd15-random",
        path="(built in memory from SD 1.5's configs)",
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler_config=dict(SCHEDULER_CONFIG),
        vae_scale_factor=8,
        scaling_factor=VAE_CONFIG["scaling_factor"],
        prediction_type="epsilon",
        device=device,
        dtype=dtype,
        model_hash="random",
    )


def build_tiny(device: torch.device) -> LoadedModel:
    """The tiny model the tests use (worker/tiny.py), loaded as a worker loads it."""
    path = make_tiny(Path(tempfile.mkdtemp(prefix="sdfarm-tiny-")) / "tiny")
    return load_model("tiny", str(path), device=str(device))


def sd15_pipeline(model: LoadedModel, scheduler: SchedulerMixin) -> StableDiffusionPipeline:
    """diffusers' SD 1.x pipeline from the model's components, without a safety checker."""
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
