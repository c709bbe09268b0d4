"""A tiny, randomly initialised Stable Diffusion model of the real SD 1.x architecture.

No weights can be downloaded where sdfarm is built and tested, so tests, CI and the demo render
with this: the same component classes and block types as SD 1.x (CLIP text encoder, conditional
U-Net with three cross-attention down blocks, an AutoencoderKL that downsamples by 8, LMS with
SD 1.x's noise schedule), only narrow and shallow, a few MB on disk. The folder is an ordinary
diffusers model folder: `StableDiffusionPipeline.from_pretrained` loads it, and so does
`worker.models.load_model`, so code that works on it works unchanged on real weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, LMSDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from worker.models import quiet_hf_progress_bars
from worker.tiny_sdxl import (
    SDXL_SCALING_FACTOR,
    refiner_components,
    refiner_model_index,
    sdxl_components,
    sdxl_model_index,
    write_model_index,
)
from worker.tokenizer import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, write_tokenizer

__all__ = ["ARCHES", "PREDICTION_TYPES", "make_tiny", "make_tiny_vae"]

log = logging.getLogger(__name__)

# "v_prediction" gives an SD 2.x-style model; LMS supports no other kind.
PREDICTION_TYPES = ("epsilon", "v_prediction")
# SD 1.x (and 2.x with v_prediction); SDXL base and refiner (worker/tiny_sdxl.py)
ARCHES = ("sd1", "sdxl", "sdxl-refiner")

TEXT_HIDDEN = 32  # also the U-Net's cross_attention_dim, as 768 is for both in SD 1.x
SAMPLE_SIZE_PX = 64  # the pipeline's default height and width for this model


def _text_encoder(vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",  # as CLIP ViT-L/14, SD 1.x's text encoder
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config)


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SAMPLE_SIZE_PX // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        attention_head_dim=8,  # SD 1.x's value (it is the number of heads there too)
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=32,
    )


def _vae(scaling_factor: float = 0.18215, *, force_upcast: bool = True) -> AutoencoderKL:
    # PyTorch's default init is already small enough here: decoded images from random latents sit
    # around mid-grey with a spread of ~40 levels and under 1% of pixels clipped, so images from
    # different seeds and prompts differ visibly (tests/test_parity.py checks this).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        # Four blocks (three downsamplings: a factor of 8), kept narrow so the folder stays small.
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=SAMPLE_SIZE_PX,
        scaling_factor=scaling_factor,  # SD 1.x's 0.18215 by default
        force_upcast=force_upcast,  # read by diffusers' SDXL pipelines only
    )


def _scheduler(prediction_type: str) -> LMSDiscreteScheduler:
    # SD 1.x's scheduler_config.json values, which LMS reads from the model at render time.
    return LMSDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _model_index() -> dict[str, object]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "LMSDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def make_tiny(
    dir: Path, *, seed: int = 0, prediction_type: str = "epsilon", arch: str = "sd1"
) -> Path:
    """Write a tiny model folder of architecture `arch` to `dir` and return `dir`.

    The same `seed` always gives the same weights, byte for byte.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
        )
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {', '.join(ARCHES)}, got {arch!r}")
    if arch != "sd1" and prediction_type != "epsilon":
        raise ValueError("the tiny SDXL is an epsilon-prediction model, as SDXL 1.0 is")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)

    tokenizers = {"sd1": ["tokenizer"], "sdxl": ["tokenizer", "tokenizer_2"]}
    for name in tokenizers.get(arch, ["tokenizer_2"]):
        write_tokenizer(dir / name)
    vocab_file = dir / ("tokenizer_2" if arch == "sdxl-refiner" else "tokenizer") / "vocab.json"
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))

    # fork_rng: seeding must not change the random state of whoever called us.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch != "sd1":
            build = sdxl_components if arch == "sdxl" else refiner_components
            parts = build(len(vocab), vocab[BOS_TOKEN], vocab[EOS_TOKEN])
            parts["vae"] = _vae(SDXL_SCALING_FACTOR, force_upcast=True)
        else:
            parts = {
                "text_encoder": _text_encoder(len(vocab), vocab[BOS_TOKEN], vocab[EOS_TOKEN]),
                "unet": _unet(),
                "vae": _vae(),
                "scheduler": _scheduler(prediction_type),
            }

    for name, part in parts.items():
        if name.startswith("text_encoder"):
            with quiet_hf_progress_bars():  # transformers draws a bar even for a one-file save
                part.save_pretrained(dir / name)  # type: ignore[attr-defined]
        elif name == "scheduler":
            part.save_pretrained(dir / name)  # type: ignore[attr-defined]
        else:
            part.save_pretrained(dir / name, safe_serialization=True)  # type: ignore[attr-defined]
    index = {"sd1": _model_index, "sdxl": sdxl_model_index, "sdxl-refiner": refiner_model_index}
    write_model_index(dir, index[arch]())
    log.info("wrote a tiny %s %s model (seed %d) to %s", arch, prediction_type, seed, dir)
    return dir


def make_tiny_vae(dir: Path, *, seed: int = 1, scaling_factor: float = 0.18215) -> Path:
    """Write the tiny models' VAE alone, an AutoencoderKL folder (`SDFARM_VAES`, worker/vaes.py),
    with weights of its own `seed`: an override that decodes visibly unlike a model's own."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _vae(scaling_factor)
    vae.save_pretrained(Path(dir), safe_serialization=True)
    return Path(dir)
