"""Tiny, randomly initialised models of the real SDXL architectures (`make-tiny --arch sdxl`, and
`--arch sdxl-refiner`).

The same component classes and block types as SDXL 1.0 base: two CLIP text encoders (a ViT-L-like
`CLIPTextModel` and an OpenCLIP-bigG-like `CLIPTextModelWithProjection`, whose penultimate hidden
states are concatenated and whose projection gives the pooled embedding), a U-Net with SDXL's
block layout, linear projections and `text_time` additional conditioning (pooled embedding plus
six size and crop numbers), an AutoencoderKL with SDXL's scaling factor and `force_upcast`, and
SDXL's Euler scheduler config. Only narrow and shallow: a few MB on disk. The folder loads with
diffusers' `StableDiffusionXLPipeline.from_pretrained` as it is. The refiner, as SDXL 1.0's, has
only the second encoder, a four-level U-Net that reads five conditioning numbers (original size,
crop top-left, aesthetic score), and loads with `StableDiffusionXLImg2ImgPipeline`.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from worker.tokenizer import MODEL_MAX_LENGTH

__all__ = [
    "SDXL_SCALING_FACTOR",
    "refiner_components",
    "refiner_model_index",
    "sdxl_components",
    "sdxl_model_index",
    "write_model_index",
]

TEXT_HIDDEN = (32, 32)  # the two encoders' widths (768 and 1280 in SDXL)
PROJECTION_DIM = 32  # text_encoder_2's projection: the pooled embedding (1280 in SDXL)
TIME_EMBED_DIM = 8  # addition_time_embed_dim (256 in SDXL), per size or crop number
SDXL_SAMPLE_SIZE_PX = 64
SDXL_SCALING_FACTOR = 0.13025  # SDXL's VAE (the VAE itself is built as for SD 1.x, worker/tiny.py)


def _text_config(
    vocab_size: int, bos_id: int, eos_id: int, hidden: int, act: str
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,  # the penultimate layer's states are what SDXL reads
        num_attention_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=act,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        projection_dim=PROJECTION_DIM,
    )


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SDXL_SAMPLE_SIZE_PX // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=sum(TEXT_HIDDEN),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
        norm_num_groups=32,
    )


def _refiner_unet() -> UNet2DConditionModel:
    """SDXL refiner's layout: four levels with attention in the middle two, cross-attention on
    the bigG encoder alone, and five `text_time` numbers (sizes, crop, aesthetic score)."""
    return UNet2DConditionModel(
        sample_size=SDXL_SAMPLE_SIZE_PX // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        transformer_layers_per_block=1,
        attention_head_dim=(2, 4, 4, 4),
        cross_attention_dim=TEXT_HIDDEN[1],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=5 * TIME_EMBED_DIM + PROJECTION_DIM,
        norm_num_groups=32,
    )


def _scheduler() -> EulerDiscreteScheduler:
    # SDXL 1.0 base's scheduler_config.json values.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
        prediction_type="epsilon",
    )


def sdxl_components(vocab_size: int, bos_id: int, eos_id: int) -> dict[str, object]:
    """The modules of a tiny SDXL base but its VAE, by sub-folder name (the caller seeds torch
    first and adds the VAE)."""
    first = _text_config(vocab_size, bos_id, eos_id, TEXT_HIDDEN[0], "quick_gelu")
    second = _text_config(vocab_size, bos_id, eos_id, TEXT_HIDDEN[1], "gelu")
    return {
        "text_encoder": CLIPTextModel(first),
        "text_encoder_2": CLIPTextModelWithProjection(second),
        "unet": _unet(),
        "scheduler": _scheduler(),
    }


def refiner_components(vocab_size: int, bos_id: int, eos_id: int) -> dict[str, object]:
    """The modules of a tiny SDXL refiner but its VAE: only the second (bigG-like) encoder."""
    second = _text_config(vocab_size, bos_id, eos_id, TEXT_HIDDEN[1], "gelu")
    return {
        "text_encoder_2": CLIPTextModelWithProjection(second),
        "unet": _refiner_unet(),
        "scheduler": _scheduler(),
    }


def refiner_model_index() -> dict[str, object]:
    """As SDXL 1.0 refiner's: an img2img pipeline without the first encoder, conditioned on an
    aesthetic score, and an empty negative prompt encoded (no zeros)."""
    index = sdxl_model_index()
    index |= {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "force_zeros_for_empty_prompt": False,
        "requires_aesthetics_score": True,
        "text_encoder": [None, None],
        "tokenizer": [None, None],
    }
    return index


def sdxl_model_index() -> dict[str, object]:
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_model_index(dir: Path, index: dict[str, object]) -> None:
    (dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
