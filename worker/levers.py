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
- **Compile cache** (`compile_cache_dir`, worker/compile_cache.py): compiled graphs kept on a
  volume, so a restarted worker on a machine that compiled before starts warm; the warm-up logs
  whether it was cold or warm and how long it took. A cold worker still takes no work until it
  has compiled (it says about how long that will be): compiling on a background thread while
  serving eager would let a chunk's LoRA activation change the U-Net while dynamo traces it.

Levers not yet measured on a GPU, each a setting and off by default until `bench/gpu.py
--levers all` (which measures each one on and off, the same jobs, in one run) shows it helps:

- `attention_backend` (worker/attention.py): one SDPA kernel (flash, efficient, cudnn, math), or
  `auto`, the fastest at the model's attention shape, timed at start. `default`: torch's choice.
- `vae_slicing`: `on` (today, CUDA only), `auto` (decode whole passes where free memory at start
  holds the largest pass's decode; sliced where not), `off`.
- `compile_vae`: the VAE's decoder compiled too (channels-last with `channels_last`, on CUDA).
- `compile_mode`: torch.compile's mode; `reduce-overhead` and `max-autotune` use CUDA graphs for
  the fixed shapes a warm worker serves. `compile_backend`: `inductor`; `eager` only traces.
- `compile_only_warm_sizes` (worker/compiled.py): compiled graphs only for the shapes warmed up;
  any other size runs eager (the graph-free fallback) instead of compiling while its job waits.
- `lms_precompute` (worker/lms_table.py): LMS's coefficients tabulated once per schedule, not
  integrated with scipy on the host at every step; the images are bit for bit the same.

`apply_levers` sets every lever both ways (on, and back off), so one loaded model can be
measured with each lever in turn.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor2_0

from shared.errors import InvalidJob
from worker.attention import set_attention_backend
from worker.compiled import ShapeGate, compile_module
from worker.models import LoadedModel
from worker.schedulers import set_host_precompute

if TYPE_CHECKING:
    # Only for the type: bench/gpu.py imports this module where pydantic-settings may be absent.
    from shared.config import Settings

__all__ = ["VAE_BYTES_PER_PIXEL", "Levers", "apply_levers", "apply_vae_levers", "parse_sizes"]

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^(\d+)x(\d+)$")
# Peak VAE decoder bytes per decoded pixel (one image at a time when sliced): a few full-size
# 128-channel tensors in fp16, GroupNorm's float32 copies and convolution workspace.
VAE_BYTES_PER_PIXEL = 6000
# `vae_slicing=auto` decodes whole passes when the largest one's decode takes at most this share
# of the memory free at start (the rest is for the U-Net's passes, which rows_per_pass sizes).
WHOLE_DECODE_SHARE = 0.4


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
    # Not yet measured on a GPU: off (today's behaviour) until bench/gpu.py --levers shows a gain.
    attention_backend: str = "default"  # default, auto, flash, efficient, cudnn, math
    vae_slicing: str = "on"  # on (CUDA only), auto (from free memory), off
    compile_vae: bool = False
    compile_mode: str = "default"  # reduce-overhead, max-autotune: CUDA graphs
    compile_only_warm_sizes: bool = False  # other sizes eager, not compiled while a job waits
    compile_cache_dir: Path | None = None  # graphs kept across restarts (worker/compile_cache.py)
    lms_precompute: bool = False  # LMS coefficients once per schedule, not every step

    @classmethod
    def from_settings(cls, settings: Settings) -> Levers:
        return cls(
            cudnn_benchmark=settings.cudnn_benchmark,
            tf32=settings.tf32,
            compile_unet=settings.compile_unet,
            compile_backend=settings.compile_backend,
            compile_sizes=parse_sizes(settings.compile_sizes),
            warm_up_rows=settings.max_batch,
            vae_tiling_above_px=settings.vae_tiling_above_px,
            max_pass_pixels=settings.max_pass_pixels,
            attention_backend=settings.attention_backend,
            vae_slicing=settings.vae_slicing,
            compile_vae=settings.compile_vae,
            compile_mode=settings.compile_mode,
            compile_only_warm_sizes=settings.compile_only_warm_sizes,
            compile_cache_dir=settings.compile_cache_dir,
            lms_precompute=settings.lms_precompute,
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
    """Set every lever that applies to the model's device; compile the U-Net when asked.

    Compiling is lazy: the first pass of each shape pays for it, so a worker then warms up
    (`worker.passes.warm_up`) before it takes work.
    """
    cuda = model.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = levers.cudnn_benchmark
        _set_tf32(levers.tf32)
        set_attention_backend(model, levers.attention_backend, levers.warm_up_rows)
    set_host_precompute(levers.lms_precompute)
    if any(not isinstance(p, AttnProcessor2_0) for p in model.unet.attn_processors.values()):
        log.info("model %s: setting SDPA attention (AttnProcessor2_0)", model.name)
        model.unet.set_attn_processor(AttnProcessor2_0())
    if cuda:
        model.unet.to(memory_format=_memory_format(levers))
    apply_vae_levers(model.vae, levers, model.device, model.vae_scale_factor)
    gate = ShapeGate() if levers.compile_only_warm_sizes else None
    if levers.compile_unet:
        compile_module(model.unet, levers.compile_backend, levers.compile_mode, gate)
    if levers.compile_vae:
        compile_module(model.vae.decoder, levers.compile_backend, levers.compile_mode, gate)


def apply_vae_levers(
    vae: AutoencoderKL, levers: Levers, device: torch.device, vae_scale_factor: int
) -> None:
    """The VAE's levers (a model's own, or a VAE override of worker/vaes.py): slicing on CUDA
    (`vae_slicing`), tiling above `vae_tiling_above_px`."""
    if device.type == "cuda":
        vae.to(memory_format=_memory_format(levers))
        if _slice_decodes(vae, levers, device):
            vae.enable_slicing()
        else:
            vae.disable_slicing()
    tile_px = levers.vae_tiling_above_px
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // vae_scale_factor


def _memory_format(levers: Levers) -> torch.memory_format:
    return torch.channels_last if levers.channels_last else torch.contiguous_format


def _slice_decodes(vae: AutoencoderKL, levers: Levers, device: torch.device) -> bool:
    """`vae_slicing`: on, off, or (auto) on only where the largest pass's whole decode would
    take more than WHOLE_DECODE_SHARE of the memory free now."""
    if levers.vae_slicing != "auto":
        return levers.vae_slicing == "on"
    free, _total = torch.cuda.mem_get_info(device)
    side = min(max(max(w, h) for w, h in levers.compile_sizes), levers.vae_tiling_above_px)
    scale = torch.finfo(vae.dtype).bits / 16
    whole = VAE_BYTES_PER_PIXEL * scale * side * side * levers.warm_up_rows
    sliced = whole > WHOLE_DECODE_SHARE * free
    log.info(
        "VAE slicing auto: a whole decode of %d rows at %d px needs %.1f GiB of %.1f free: %s",
        levers.warm_up_rows,
        side,
        whole / 2**30,
        free / 2**30,
        "sliced" if sliced else "whole passes",
    )
    return sliced


def _set_tf32(enabled: bool) -> None:
    # The legacy flags on purpose: torch >= 2.9 also has `fp32_precision`, but once it is set,
    # reading the legacy flags raises, and inductor (conv templates) and diffusers still read them.
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
