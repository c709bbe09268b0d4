"""Loading a Stable Diffusion model once, component by component, for the sampling loop.

A worker keeps the tokenizer, text encoder, U-Net and VAE resident and runs the loop itself
(worker/sampler.py), so it loads the four components with their own classes rather than through
a diffusers pipeline object. Everything model-specific the loop needs (the scheduler config, the
VAE's scaling factor and downsampling, the prediction type) is read from the model folder here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from shared.errors import ModelLoadError
from shared.families import FAMILIES, family_of
from worker.checkpoints import CHECKPOINT_SUFFIXES
from worker.model_files import (
    COMPONENTS,
    check_folder,
    quiet_hf_progress_bars,
    read_folder,
    read_single_file,
)

__all__ = [
    "COMPONENTS",
    "FAMILIES",
    "LoadedModel",
    "load_model",
    "model_hash",
    "quiet_hf_progress_bars",
]

log = logging.getLogger(__name__)

# Where the U-Net's weights may sit in a diffusers folder, preferred first.
UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class LoadedModel:
    """One model's components on their device, and what the sampling loop reads from its config."""

    name: str
    path: str
    tokenizer: CLIPTokenizer  # an SDXL refiner's is its only one, `tokenizer_2`
    text_encoder: CLIPTextModel | None  # None for an SDXL refiner, which reads only the second
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    vae_scale_factor: int  # pixels per latent cell, 8 for every SD 1.x/2.x VAE
    scaling_factor: float  # vae.config.scaling_factor: 0.18215 for SD 1.x/2.x
    prediction_type: str  # "epsilon" (SD 1.x, 2.x-base) or "v_prediction" (SD 2.x 768)
    device: torch.device
    dtype: torch.dtype
    model_hash: str  # A1111's short hash, written into PNG metadata
    family: str = "sd1"  # one of FAMILIES
    # SDXL: the second tokenizer and text encoder (OpenCLIP bigG with projection).
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    # SDXL: an empty negative prompt is zeros rather than the encoded "" (model_index.json).
    force_zeros_for_empty_prompt: bool = False
    # SDXL refiner: its `text_time` conditioning ends with an aesthetic score, not a target size.
    requires_aesthetics_score: bool = False
    # Textual-inversion embeddings installed (worker/embeddings.py): name -> A1111 short hash.
    embeddings: dict[str, str] = field(default_factory=dict)
    # A job's VAE override in place of the model's own (worker/vaes.py `with_vae`): its hash,
    # for the PNG's `VAE hash`; None while the model's own VAE is in place.
    vae_hash: str | None = None

    @property
    def native_px(self) -> int:
        """The side of the square the model was trained at (U-Net sample size x VAE factor)."""
        size = self.unet.config.sample_size  # an int, or (height, width) in some configs
        side = size if isinstance(size, int) else max(size)
        return int(side) * self.vae_scale_factor


def model_hash(path: Path) -> str:
    """A1111's short hash: the first 10 hex digits of the SHA-256 of the weights file.

    For a diffusers folder, whose weights are split by component, the U-Net's file stands in.
    """
    weights = path
    if path.is_dir():
        candidates = [path / "unet" / name for name in UNET_WEIGHTS]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ModelLoadError(f"{path} has no U-Net weights; looked for {candidates[0]}")
        weights = found[0]
    with weights.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:10]


def load_model(
    name: str,
    path: str,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load the model folder or single-file checkpoint at `path` onto `device`, for inference.

    `dtype` defaults to float16 on CUDA (as SD is usually run) and float32 elsewhere, where
    half precision is slow or unsupported. Raises ModelLoadError naming the part that failed.
    The speed levers are the caller's to pull on the result (`worker.levers.apply_levers`).
    """
    root = Path(path)
    single_file = root.is_file() and root.suffix in CHECKPOINT_SUFFIXES
    if not single_file:
        check_folder(name, root)
    torch_device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if torch_device.type == "cuda" else torch.float32

    started = time.perf_counter()
    component = "single-file checkpoint" if single_file else "model folder"
    try:
        parts = read_single_file(root, dtype) if single_file else read_folder(root, dtype)
        component = "hash"
        short_hash = model_hash(root)
    except ModelLoadError as e:
        raise ModelLoadError(f"model {name!r}: {e}") from e
    except Exception as e:  # wrapped, not swallowed: the worker must say which part failed
        raise ModelLoadError(f"model {name!r}: cannot load {component} from {root}: {e}") from e

    for module in parts.modules():
        module.to(torch_device)
        module.eval()
        module.requires_grad_(False)
    unet, vae, second = parts.unet, parts.vae, parts.second
    family = family_of(
        unet.config,
        second_text_encoder=second is not None,
        first_text_encoder=parts.text_encoder is not None,
    )
    upcast = vae.config.get("force_upcast", False)
    if family.startswith("sdxl") and dtype == torch.float16 and upcast:
        # SDXL's VAE overflows in float16; its config says so, and diffusers' SDXL pipelines
        # then run it in float32. Kept there for good rather than cast back and forth per pass.
        torch.nn.Module.to(vae, torch.float32)

    model = LoadedModel(
        name=name,
        path=str(root),
        tokenizer=parts.tokenizer,
        text_encoder=parts.text_encoder,
        unet=unet,
        vae=vae,
        scheduler_config=parts.scheduler_config,
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        scaling_factor=float(vae.config.scaling_factor),
        prediction_type=str(parts.scheduler_config.get("prediction_type", "epsilon")),
        device=torch_device,
        dtype=dtype,
        model_hash=short_hash,
        family=family,
        tokenizer_2=second[0] if second else None,
        text_encoder_2=second[1] if second else None,
        force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
        requires_aesthetics_score=parts.requires_aesthetics_score,
    )
    log.info(
        "model %s (%s) loaded from %s on %s (%s, %s, hash %s) in %.1f s",
        name,
        model.family,
        root,
        torch_device,
        str(dtype).removeprefix("torch."),
        model.prediction_type,
        short_hash,
        time.perf_counter() - started,
    )
    return model
