"""Speed levers pulled on a model once, after it is loaded (`worker.main.load_models`).

Each lever, and why it is set as it is:

- **fp16 weights** on CUDA: `models.load_model`'s default dtype (half the bytes, tensor cores).
- **SDPA attention**: diffusers' default processor on torch 2 (`AttnProcessor2_0`) runs flash or
  memory-efficient kernels and never holds the tokens² attention matrix. A model that comes with
  another processor is set back to it.
- **channels-last** (CUDA): cuDNN's fast fp16 convolutions are NHWC; in NCHW it transposes.
- **cuDNN autotuning** (CUDA): times the convolution algorithms once per shape; a farm sees few
  shapes (sizes x chunk sizes), so it pays once. A redelivered job may then differ by a level.
- **TF32 off** by default: it only touches float32 matmuls and convolutions, so with fp16 weights
  it buys nothing measurable, and with float32 weights (chosen for exactness) it made an image
  depend on its batch-mates by ~10 levels (measured). `tf32=True` is there for who wants it.
- **torch.compile** (optional, `sdfarm worker --compile`): the U-Net only, ~97% of the FLOPs.
  Warmed up at start (`worker.passes.warm_up`) for each configured size at the largest pass and
  at one row: the second shape makes dynamo compile a graph with a dynamic batch, which serves
  every chunk size, so the first jobs never pay for compilation.
- **VAE slicing** (CUDA): decode one image at a time, so the decoder's peak is one image's, not
  the chunk's; at 512x512 a single decode already keeps a GPU busy.
- **VAE tiling** above `vae_tiling_above_px`: bounded memory at 2048x2048. Tiles are blended, so
  pixels differ slightly from an untiled decode, only at those sizes.
- **Passes sized to memory** (`worker.passes.rows_per_pass`): a chunk whose rows would not fit
  renders in several passes; each row's noise comes from its own seed, so the images are the same.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor2_0

from shared.errors import InvalidJob
from worker.models import LoadedModel

if TYPE_CHECKING:
    # Only for the type: bench/gpu.py imports this module where pydantic-settings may be absent.
    from shared.config import Settings

__all__ = ["Levers", "apply_levers", "apply_vae_levers", "parse_sizes"]

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Levers:
    """Which levers a worker pulls on a loaded model; usually built by `from_settings`."""

    cudnn_benchmark: bool = True
    tf32: bool = False
    channels_last: bool = True
    compile_unet: bool = False
    compile_backend: str = "inductor"  # "eager" only traces: checks the path on a CPU in seconds
    compile_sizes: tuple[tuple[int, int], ...] = ((512, 512),)  # (width, height)
    warm_up_rows: int = 8  # the largest chunk: settings.max_batch
    vae_tiling_above_px: int = 1024
    max_pass_pixels: int | None = None  # rows x width x height; None: from free GPU memory

    @classmethod
    def from_settings(cls, settings: Settings) -> Levers:
        return cls(
            cudnn_benchmark=settings.cudnn_benchmark,
            tf32=settings.tf32,
            compile_unet=settings.compile_unet,
            compile_sizes=parse_sizes(settings.compile_sizes),
            warm_up_rows=settings.max_batch,
            vae_tiling_above_px=settings.vae_tiling_above_px,
            max_pass_pixels=settings.max_pass_pixels,
        )


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """`512x512,768x512` -> ((512, 512), (768, 512)), refusing anything else by name."""
    sizes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = _SIZE.match(part)
        if not match:
            raise InvalidJob(f"`compile_sizes` entries look like 512x512; got {part!r}")
        sizes.append((int(match[1]), int(match[2])))
    return tuple(sizes)


def apply_levers(model: LoadedModel, levers: Levers) -> None:
    """Pull every lever that applies to the model's device; compile the U-Net when asked.

    Compiling is lazy: the first pass of each shape pays for it, so a worker then warms up
    (`worker.passes.warm_up`) before it takes work.
    """
    cuda = model.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = levers.cudnn_benchmark
        _set_tf32(levers.tf32)
    if any(not isinstance(p, AttnProcessor2_0) for p in model.unet.attn_processors.values()):
        log.info("model %s: setting SDPA attention (AttnProcessor2_0)", model.name)
        model.unet.set_attn_processor(AttnProcessor2_0())
    if cuda and levers.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    apply_vae_levers(model.vae, levers, model.device, model.vae_scale_factor)
    if levers.compile_unet:
        model.unet.compile(backend=levers.compile_backend)


def apply_vae_levers(
    vae: AutoencoderKL, levers: Levers, device: torch.device, vae_scale_factor: int
) -> None:
    """The VAE's levers (a model's own, or a VAE override of worker/vaes.py): slicing on CUDA,
    tiling above `vae_tiling_above_px`."""
    if device.type == "cuda":
        if levers.channels_last:
            vae.to(memory_format=torch.channels_last)
        vae.enable_slicing()
    tile_px = levers.vae_tiling_above_px
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // vae_scale_factor


def _set_tf32(enabled: bool) -> None:
    # The legacy flags on purpose: torch >= 2.9 also has `fp32_precision`, but once it is set,
    # reading the legacy flags raises, and inductor (conv templates) and diffusers still read them.
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
