"""Loading a Stable Diffusion model once, component by component, for the sampling loop.

A worker keeps the tokenizer, text encoder, U-Net and VAE resident and runs the loop itself
(worker/sampler.py), so it loads the four components with their own classes rather than through
a diffusers pipeline object. Everything model-specific the loop needs (the scheduler config, the
VAE's scaling factor and downsampling, the prediction type) is read from the model folder here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as hf_logging

from shared.errors import ModelLoadError
from shared.families import FAMILIES, family_of
from worker.checkpoints import CHECKPOINT_SUFFIXES, load_single_file

__all__ = [
    "COMPONENTS",
    "FAMILIES",
    "LoadedModel",
    "load_model",
    "model_hash",
    "quiet_hf_progress_bars",
]

log = logging.getLogger(__name__)

# The sub-folders of a diffusers Stable Diffusion model that the sampling loop uses.
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")

# Where the U-Net's weights may sit in a diffusers folder, preferred first.
UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class LoadedModel:
    """One model's components on their device, and what the sampling loop reads from its config."""

    name: str
    path: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
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

    @property
    def native_px(self) -> int:
        """The side of the square the model was trained at (U-Net sample size x VAE factor)."""
        size = self.unet.config.sample_size  # an int, or (height, width) in some configs
        side = size if isinstance(size, int) else max(size)
        return int(side) * self.vae_scale_factor


@contextmanager
def quiet_hf_progress_bars() -> Iterator[None]:
    """Turn off transformers' per-load progress bars, which would clutter worker logs."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


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


def _check_folder(name: str, root: Path) -> None:
    if not root.exists():
        raise ModelLoadError(f"model {name!r}: {root} does not exist")
    if not root.is_dir():
        raise ModelLoadError(
            f"model {name!r}: {root} is a file but not a single-file checkpoint "
            f"({' or '.join(CHECKPOINT_SUFFIXES)}); sdfarm loads those and diffusers-format "
            f"model folders (model_index.json with {', '.join(COMPONENTS)} sub-folders)"
        )
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise ModelLoadError(
            f"model {name!r}: {root} is not a diffusers Stable Diffusion folder; "
            f"missing sub-folder(s): {', '.join(missing)}"
        )


def _load_folder(
    root: Path, dtype: torch.dtype
) -> tuple[CLIPTokenizer, CLIPTextModel, UNet2DConditionModel, AutoencoderKL, dict[str, Any]]:
    """A diffusers folder's tokenizer, text encoder, U-Net, VAE and scheduler config."""
    component = "scheduler"
    try:
        scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        component = "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        with quiet_hf_progress_bars():
            component = "text_encoder"
            text_encoder = CLIPTextModel.from_pretrained(
                root / "text_encoder", dtype=dtype, local_files_only=True
            )
            component = "unet"
            unet = UNet2DConditionModel.from_pretrained(
                root / "unet", torch_dtype=dtype, local_files_only=True
            )
            component = "vae"
            vae = AutoencoderKL.from_pretrained(
                root / "vae", torch_dtype=dtype, local_files_only=True
            )
    except Exception as e:  # wrapped, not swallowed: the worker must say which part failed
        raise ModelLoadError(f"cannot load {component} from {root}: {e}") from e
    return tokenizer, text_encoder, unet, vae, scheduler_config


def _load_second_encoder(
    root: Path, dtype: torch.dtype
) -> tuple[CLIPTokenizer, CLIPTextModelWithProjection] | None:
    """SDXL's second tokenizer and text encoder, when the folder has them."""
    if not (root / "text_encoder_2").is_dir():
        return None
    component = "tokenizer_2"
    try:
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)
        component = "text_encoder_2"
        with quiet_hf_progress_bars():
            encoder = CLIPTextModelWithProjection.from_pretrained(
                root / "text_encoder_2", dtype=dtype, local_files_only=True
            )
    except Exception as e:  # wrapped, not swallowed: the worker must say which part failed
        raise ModelLoadError(f"cannot load {component} from {root}: {e}") from e
    return tokenizer, encoder


def _force_zeros(root: Path) -> bool:
    index = root / "model_index.json"
    if not index.is_file():
        return False
    return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", False))


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
        _check_folder(name, root)
    torch_device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if torch_device.type == "cuda" else torch.float32

    started = time.perf_counter()
    component = "single-file checkpoint" if single_file else "model folder"
    try:
        if single_file:
            parts = load_single_file(root)
            tokenizer, text_encoder, unet, vae = (
                parts.tokenizer,
                parts.text_encoder,
                parts.unet,
                parts.vae,
            )
            scheduler_config = parts.scheduler_config
            for module in (text_encoder, unet, vae):
                # nn.Module.to, not diffusers' override, which warns about every dtype cast.
                torch.nn.Module.to(module, dtype)
            second = None
        else:
            tokenizer, text_encoder, unet, vae, scheduler_config = _load_folder(root, dtype)
            second = _load_second_encoder(root, dtype)
        component = "hash"
        short_hash = model_hash(root)
    except ModelLoadError as e:
        raise ModelLoadError(f"model {name!r}: {e}") from e
    except Exception as e:  # wrapped, not swallowed: the worker must say which part failed
        raise ModelLoadError(f"model {name!r}: cannot load {component} from {root}: {e}") from e

    modules = [text_encoder, unet, vae] + ([second[1]] if second else [])
    for module in modules:
        module.to(torch_device)
        module.eval()
        module.requires_grad_(False)
    family = family_of(unet.config, second_text_encoder=second is not None)
    if family == "sdxl" and dtype == torch.float16 and vae.config.get("force_upcast", False):
        # SDXL's VAE overflows in float16; its config says so, and diffusers' SDXL pipelines
        # then run it in float32. Kept there for good rather than cast back and forth per pass.
        torch.nn.Module.to(vae, torch.float32)

    model = LoadedModel(
        name=name,
        path=str(root),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler_config=scheduler_config,
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        scaling_factor=float(vae.config.scaling_factor),
        prediction_type=str(scheduler_config.get("prediction_type", "epsilon")),
        device=torch_device,
        dtype=dtype,
        model_hash=short_hash,
        family=family,
        tokenizer_2=second[0] if second else None,
        text_encoder_2=second[1] if second else None,
        force_zeros_for_empty_prompt=not single_file and _force_zeros(root),
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
