"""SDXL 1.0 base's full-size architecture with random weights, for bench/gpu.py; and the tiny SDXL.

The configs below are the values of `stabilityai/stable-diffusion-xl-base-1.0`'s `unet/`, `vae/`,
`text_encoder/` (CLIP ViT-L/14's text tower) and `text_encoder_2/` (OpenCLIP ViT-bigG/14's, with
its projection) config.json, and its scheduler_config.json: the U-Net's 2,567.5 M parameters,
the encoders' 123.1 M and 694.7 M, the VAE's 83.7 M. As for SD 1.5 (bench/sd15.py), the
tokenizers are sdfarm's own: every prompt is padded to CLIP's 77 tokens whatever the vocabulary.

The encoders and the U-Net are built directly on the device in the target dtype (no float32 copy
to cast: 3.4 B parameters), the VAE in float32 where its config says `force_upcast`, as
`worker.models.load_model` keeps it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench.sd15 import own_tokenizer
from worker.models import LoadedModel, load_model
from worker.tiny import make_tiny
from worker.tokenizer import BOS_TOKEN, EOS_TOKEN

__all__ = ["SCHEDULER_CONFIG", "build_sdxl", "build_tiny_sdxl", "diffusers_vae", "sdxl_pipeline"]

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,  # 1024 px
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # heads per level (64 channels each), as diffusers names it
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,  # the two encoders' 768 + 1280, side by side
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 size numbers x 256 + the pooled 1280
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
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,  # it overflows in float16: run in float32
}

TEXT_CONFIG: dict[str, Any] = {  # CLIP ViT-L/14's text tower, as SD 1.5's
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

TEXT_2_CONFIG: dict[str, Any] = {  # OpenCLIP ViT-bigG/14's text tower, with its projection
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

SCHEDULER_CONFIG: dict[str, Any] = {  # its EulerDiscreteScheduler's; the farm's samplers read it
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
}


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    kept = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(kept)


def build_sdxl(device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """SDXL base's two tokenizers and text encoders, U-Net and VAE, random weights, on `device`."""
    tokenizer, vocab = own_tokenizer()
    tokenizer_2, _ = own_tokenizer()  # SDXL's two tokenizers differ only in their pad token
    ids = {"bos_token_id": vocab[BOS_TOKEN], "eos_token_id": vocab[EOS_TOKEN]}
    ids["pad_token_id"] = ids["eos_token_id"]
    upcast = dtype == torch.float16 and VAE_CONFIG["force_upcast"]
    vae_dtype = torch.float32 if upcast else dtype
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(dtype):
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG, **ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2_CONFIG, **ids))
        unet = UNet2DConditionModel(**UNET_CONFIG)
    with torch.device(device), _default_dtype(vae_dtype):
        vae = AutoencoderKL(**VAE_CONFIG)
    for module in (text_encoder, text_encoder_2, unet, vae):
        module.eval()
        module.requires_grad_(False)
    return LoadedModel(
        name="sdxl-random",
        path="(built in memory from SDXL 1.0 base's configs)",
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
        family="sdxl",
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
        force_zeros_for_empty_prompt=True,  # its model_index.json's
    )


def build_tiny_sdxl(device: torch.device) -> LoadedModel:
    """The tiny SDXL the tests use (worker/tiny_sdxl.py), loaded as a worker loads it."""
    path = make_tiny(Path(tempfile.mkdtemp(prefix="sdfarm-tiny-sdxl-")) / "tiny-sdxl", arch="sdxl")
    return load_model("tiny-sdxl", str(path), device=str(device))


def sdxl_pipeline(model: LoadedModel, scheduler: SchedulerMixin) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline from the model's components (use it inside `diffusers_vae`)."""
    pipe = StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
        scheduler=scheduler, force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt,
        add_watermarker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def diffusers_vae(model: LoadedModel) -> Iterator[None]:
    """The VAE in the model's dtype, as diffusers loads it, for its pipeline's own upcasting.

    The farm keeps SDXL's VAE in float32 (worker/models.py); diffusers' pipeline, given a float32
    VAE and float16 latents, would decode them uncast and fail. A no-op in float32 (the tiny run).
    """
    kept = model.vae.dtype
    torch.nn.Module.to(model.vae, model.dtype)  # not diffusers' override: it warns on every cast
    try:
        yield
    finally:
        torch.nn.Module.to(model.vae, kept)
