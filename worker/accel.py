"""Speed levers applied to a model once at load, and passes sized so that memory never overflows.

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
  Warmed up at start for each configured size at the largest pass and at one row: the second
  shape makes dynamo compile a graph with a dynamic batch, which serves every chunk size, so the
  first jobs never pay for compilation.
- **VAE slicing** (CUDA): decode one image at a time, so the decoder's peak is one image's, not
  the chunk's; at 512x512 a single decode already keeps a GPU busy.
- **VAE tiling** above `vae_tiling_above_px`: bounded memory at 2048x2048. Tiles are blended, so
  pixels differ slightly from an untiled decode, only at those sizes.
- **Passes sized to memory** (`rows_per_pass`): a chunk whose rows would not fit renders in
  several passes; each row's noise comes from its own seed, so the images are the same.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from shared.errors import InvalidJob
from worker.models import LoadedModel
from worker.sampler import PassParams, PassResult, Row, render_pass

if TYPE_CHECKING:
    # Only for the type: bench/gpu.py imports this module where pydantic-settings may be absent.
    from shared.config import Settings

__all__ = ["Levers", "apply_levers", "render_in_passes", "rows_per_pass", "warm_up"]

log = logging.getLogger(__name__)

# Peak U-Net activation bytes per row (two samples with guidance) per output pixel, in fp16 with
# SDPA. The GEGLU feed-forward at the top resolution dominates: 4096 tokens x 10240 x 2 bytes x
# 2 samples = 170 MB at 512x512, ~650 bytes a pixel; this is that, doubled, plus the skips.
UNET_BYTES_PER_PIXEL_ROW = 1600
# Peak VAE decoder bytes per decoded pixel (one image at a time when sliced): a few full-size
# 128-channel tensors in fp16, GroupNorm's float32 copies and convolution workspace.
VAE_BYTES_PER_PIXEL = 6000
# Share of the free GPU memory a pass may plan to use: the allocator fragments, cuDNN's autotuner
# wants workspace, and another process may hold some.
MEMORY_HEADROOM = 0.8

_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Levers:
    """Which levers a worker pulls at load; `from_settings` is the usual way to build one."""

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
    """Pull every lever that applies to the model's device; compile and warm up when asked."""
    cuda = model.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = levers.cudnn_benchmark
        _set_tf32(levers.tf32)
    if any(not isinstance(p, AttnProcessor2_0) for p in model.unet.attn_processors.values()):
        log.info("model %s: setting SDPA attention (AttnProcessor2_0)", model.name)
        model.unet.set_attn_processor(AttnProcessor2_0())
    if cuda and levers.channels_last:
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    if cuda:
        model.vae.enable_slicing()
    tile_px = levers.vae_tiling_above_px
    model.vae.enable_tiling()
    model.vae.tile_sample_min_size = tile_px
    model.vae.tile_latent_min_size = tile_px // model.vae_scale_factor
    if levers.compile_unet:
        model.unet.compile(backend=levers.compile_backend)
        warm_up(model, levers)


def _set_tf32(enabled: bool) -> None:
    # The legacy flags on purpose: torch >= 2.9 also has `fp32_precision`, but once it is set,
    # reading the legacy flags raises, and inductor (conv templates) and diffusers still read them.
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def warm_up(model: LoadedModel, levers: Levers) -> None:
    """Render every pass size once for each configured image size, so no job waits to compile.

    The largest pass goes first and gets a graph of its own (the usual chunk when a farm is busy),
    then one row, then the rest. From the second shape on, dynamo compiles graphs with a dynamic
    batch, which guards in diffusers' code bound (U-Net batches 16-63 share one, smaller ones
    another, in diffusers 0.42), so a few compiles cover every size; each size still runs once
    so that shape-specialised kernels and cuDNN's timings are ready before the first job.
    """
    for width, height in levers.compile_sizes:
        params = PassParams(steps=2, width=width, height=height)
        largest = min(levers.warm_up_rows, rows_per_pass(model, params, levers.max_pass_pixels))
        for rows in dict.fromkeys([largest, 1, *range(2, largest)]):
            started = time.perf_counter()
            batch = [
                Row(prompt="warm-up", negative_prompt="", seed=i, guidance=7.5) for i in range(rows)
            ]
            render_pass(model, batch, params)
            log.info(
                "model %s: warmed up at %dx%d, %d rows, in %.1f s",
                model.name,
                width,
                height,
                rows,
                time.perf_counter() - started,
            )


def rows_per_pass(model: LoadedModel, params: PassParams, max_pass_pixels: int | None) -> int:
    """How many rows of this size one pass may hold (at least 1; no limit on a CPU unless set)."""
    pixels = params.width * params.height
    if max_pass_pixels is not None:
        return max(1, max_pass_pixels // pixels)
    if model.device.type != "cuda":
        return 1 << 30  # host memory is the OS's to page; nothing to measure it against here
    scale = torch.finfo(model.dtype).bits / 16
    free, _total = torch.cuda.mem_get_info(model.device)
    # Blocks the caching allocator holds but no tensor uses are free for this pass too.
    free += torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)
    tile = (
        model.vae.tile_sample_min_size if model.vae.use_tiling else max(params.width, params.height)
    )
    vae = VAE_BYTES_PER_PIXEL * scale * min(pixels, tile * tile)
    per_row = UNET_BYTES_PER_PIXEL_ROW * scale * pixels
    return max(1, int((free * MEMORY_HEADROOM - vae) // per_row))


def render_in_passes(
    model: LoadedModel,
    rows: Sequence[Row],
    params: PassParams,
    on_step: Callable[[int, int], None] | None = None,
    *,
    max_pass_pixels: int | None = None,
) -> PassResult:
    """`render_pass`, split into passes that fit in memory; progress counts over all of them."""
    size = rows_per_pass(model, params, max_pass_pixels)
    if len(rows) <= size:
        return render_pass(model, rows, params, on_step=on_step)
    parts = [rows[i : i + size] for i in range(0, len(rows), size)]
    log.info(
        "%d rows at %dx%d do not fit one pass: %d passes of up to %d",
        len(rows),
        params.width,
        params.height,
        len(parts),
        size,
    )
    joined = PassResult(images=[], timings={})
    for index, part in enumerate(parts):
        step_cb = None
        if on_step is not None:
            step_cb = _offset_progress(on_step, index, len(parts))
        result = render_pass(model, part, params, on_step=step_cb)
        joined.images.extend(result.images)
        joined.warnings.extend(result.warnings)  # per row, like the images
        joined.errors.extend(result.errors)
        for key, seconds in result.timings.items():
            joined.timings[key] = joined.timings.get(key, 0.0) + seconds
    return joined


def _offset_progress(
    on_step: Callable[[int, int], None], index: int, passes: int
) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        on_step(index * total + done, passes * total)

    return report
