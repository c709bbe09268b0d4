"""VAE overrides: the VAEs of `SDFARM_VAES`, loaded once, and a job's VAE put in its model's place.

A job naming `vae` decodes (and for img2img encodes) with that VAE instead of its model's own, as
A1111's "SD VAE" setting and diffusers' `StableDiffusionPipeline.from_pretrained(..., vae=...)`
do. Every worker loads every VAE of `SDFARM_VAES` at start (they are small: 84 M parameters for
SD's), so any worker may take any job and routing needs nothing more; a worker started without a
VAE its job names fails the job with a message saying to configure it.

A VAE is either

- a diffusers `AutoencoderKL` folder (config.json and weights): its own config's scaling factor is
  used, as diffusers uses `vae.config.scaling_factor` of the VAE it is given; or
- one `.safetensors`/`.ckpt` file in LDM's layout, as A1111 keeps them in `models/VAE/` (keys with
  or without `first_stage_model.`), converted with diffusers' converter against the config in
  `<file without its suffix>.config/` (a folder with config.json) beside it, else SD's own
  (worker/configs/sd1/vae); such a file holds no scaling factor, so the model's is used, as A1111
  does.

It is kept in the device's dtype (float16 on CUDA), or float32 where its config says
`force_upcast` (SDXL's VAE overflows in float16), and gets the worker's VAE levers (tiling).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from shared.errors import ModelLoadError
from worker.checkpoints import CHECKPOINT_SUFFIXES, SHIPPED_CONFIGS
from worker.levers import Levers, apply_vae_levers
from worker.models import LoadedModel

__all__ = ["LoadedVae", "load_vae", "load_vaes", "swap_vae", "vae_mismatch", "with_vae"]

log = logging.getLogger(__name__)

_FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass(frozen=True)
class LoadedVae:
    """A VAE of SDFARM_VAES on its device."""

    name: str
    path: str
    vae: AutoencoderKL
    # The VAE's own config's scaling factor (a folder); None for a single file: the model's.
    scaling_factor: float | None
    vae_hash: str  # A1111's short hash of the weights file, written as `VAE hash`

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))


def _short_hash(weights: Path) -> str:
    with weights.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:10]


def _read_folder(root: Path, dtype: torch.dtype) -> tuple[AutoencoderKL, float, Path]:
    found = [root / name for name in _FOLDER_WEIGHTS if (root / name).is_file()]
    if not (root / "config.json").is_file() or not found:
        raise ModelLoadError(
            f"{root} is not a diffusers AutoencoderKL folder: it needs config.json and "
            f"{_FOLDER_WEIGHTS[0]}"
        )
    vae = AutoencoderKL.from_pretrained(root, torch_dtype=dtype, local_files_only=True)
    return vae, float(vae.config.scaling_factor), found[0]


def _read_single_file(path: Path, dtype: torch.dtype) -> AutoencoderKL:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        load_single_file_checkpoint,
    )

    beside = path.with_suffix(".config")
    config_dir = beside if (beside / "config.json").is_file() else SHIPPED_CONFIGS / "sd1" / "vae"
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir))
    state = convert_ldm_vae_checkpoint(checkpoint, vae.config)
    result = vae.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"{path.name} is not an LDM-layout VAE of the architecture in {config_dir}: "
            f"{len(result.missing_keys)} missing keys (first: {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (first: {result.unexpected_keys[:3]})"
        )
    return vae.to(dtype)


def load_vae(
    name: str, path: str, device: str = "cpu", dtype: torch.dtype | None = None
) -> LoadedVae:
    """Load the VAE folder or single file at `path`; ModelLoadError says what is wrong."""
    root = Path(path)
    torch_device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if torch_device.type == "cuda" else torch.float32
    try:
        if root.is_file() and root.suffix in CHECKPOINT_SUFFIXES:
            vae, scaling, weights = _read_single_file(root, dtype), None, root
        elif root.is_dir():
            vae, scaling, weights = _read_folder(root, dtype)
        else:
            raise ModelLoadError(f"{root} is neither a VAE folder nor a .safetensors/.ckpt file")
        short_hash = _short_hash(weights)
    except ModelLoadError as e:
        raise ModelLoadError(f"VAE {name!r}: {e}") from e
    except Exception as e:  # wrapped, not swallowed: the worker must say which VAE failed
        raise ModelLoadError(f"VAE {name!r}: cannot load {root}: {e}") from e
    if dtype == torch.float16 and vae.config.get("force_upcast", False):
        dtype = torch.float32  # as diffusers' SDXL pipelines run such a VAE
    torch.nn.Module.to(vae, device=torch_device, dtype=dtype)
    vae.eval()
    vae.requires_grad_(False)
    log.info("VAE %s loaded from %s on %s (%s, hash %s)", name, root, device, dtype, short_hash)
    return LoadedVae(name, str(root), vae, scaling, short_hash)


def load_vaes(
    vaes: dict[str, str], device: str, levers: Levers | None = None
) -> dict[str, LoadedVae]:
    """Every VAE of SDFARM_VAES, each once, with the worker's VAE levers."""
    levers = levers or Levers()
    loaded = {}
    for name, path in vaes.items():
        vae = load_vae(name, path, device)
        apply_vae_levers(vae.vae, levers, torch.device(device), vae.vae_scale_factor)
        loaded[name] = vae
    return loaded


def vae_mismatch(model: LoadedModel, vae: LoadedVae) -> str | None:
    """Why `vae` cannot stand in for the model's own, if it cannot (another latent space)."""
    ours = (model.vae.config.latent_channels, model.vae_scale_factor)
    theirs = (vae.vae.config.latent_channels, vae.vae_scale_factor)
    if ours == theirs:
        return None
    return (
        f"VAE {vae.name!r} has {theirs[0]} latent channels and downsamples {theirs[1]}x, but "
        f"model {model.name!r} makes latents of {ours[0]} channels at {ours[1]}x"
    )


def with_vae(model: LoadedModel, vae: LoadedVae) -> LoadedModel:
    """The model with `vae` in place of its own (a shallow copy: the other parts are shared)."""
    scaling = model.scaling_factor if vae.scaling_factor is None else vae.scaling_factor
    return dataclasses.replace(model, vae=vae.vae, scaling_factor=scaling, vae_hash=vae.vae_hash)


def swap_vae(
    vaes: Mapping[str, LoadedVae], name: str | None, model: LoadedModel, refiner: LoadedModel | None
) -> tuple[LoadedModel, LoadedModel | None, str | None]:
    """A chunk's model and refiner with the VAE its jobs name in place of their own (as they are
    when `name` is None), or them unchanged and why the VAE cannot be used."""
    if name is None:
        return model, refiner, None
    vae = vaes.get(name)
    if vae is None:
        have = ", ".join(sorted(vaes)) or "none"
        why = f"this worker has no VAE {name!r} (it has: {have}); every worker must load every "
        return model, refiner, why + "VAE of SDFARM_VAES"
    problem = vae_mismatch(model, vae) or (vae_mismatch(refiner, vae) if refiner else None)
    if problem is not None:
        return model, refiner, problem
    return with_vae(model, vae), (with_vae(refiner, vae) if refiner else None), None
