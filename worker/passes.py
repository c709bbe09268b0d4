"""Passes sized so that memory never overflows, and the warm-up that compiles them before work.

A chunk whose rows would not fit on the device renders in several passes (`render_in_passes`);
each row's noise comes from its own seed, so the images are the same as in one pass. Why each
speed lever is set as it is: worker/levers.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from worker.compile_cache import CompileCache, cache_key, cold_estimate_s
from worker.compiled import warming
from worker.levers import VAE_BYTES_PER_PIXEL, Levers
from worker.models import LoadedModel
from worker.sampler import PassParams, PassResult, Row, render_pass

__all__ = ["render_in_passes", "rows_per_pass", "warm_up"]

log = logging.getLogger(__name__)

# Peak U-Net activation bytes per row (two samples with guidance) per output pixel, in fp16 with
# SDPA, for a family not in the table below: the first estimate, kept as the cautious default.
UNET_BYTES_PER_PIXEL_ROW = 1600
# Per family: about twice the peak that bench/activations.py counts (live op outputs during one
# guided call, bf16 on a CPU, 256-768 px; bench/results/activations-cpu-2026-12-06.json), rounded
# up; the second half covers what it cannot count (convolution workspace, allocator rounding).
# The peak is a GEGLU feed-forward (its 2x-wide projection, gelu and product) plus the skips,
# the same bytes a pixel at every size: SD 1.x and 2.x 520 (at the top level, 320 channels at an
# eighth of the side), SDXL 315 and its refiner 378 (no attention at the top level: 640 and 768
# channels at a sixteenth). SD 1.x's 1600 was an estimate with a feed-forward 4x too wide (10240
# for 2560); its 1100 is below it because two measurements agree: the count, and bench/gpu.py's
# peak memory on an H200 (bench/results/gpu-h200-2026-11-28.json), which grows by 525 bytes a
# pixel per row from 4 to 8 to 16 rows at 512x512 (eager; compiled, 385).
UNET_BYTES_PER_PIXEL_ROW_BY_FAMILY = {"sd1": 1100, "sd2": 1100, "sdxl": 700, "sdxl-refiner": 800}
# Share of the free GPU memory a pass may plan to use: the allocator fragments, cuDNN's autotuner
# wants workspace, and another process may hold some.
MEMORY_HEADROOM = 0.8


def warm_up(model: LoadedModel, levers: Levers) -> None:
    """Render every pass size once for each configured image size, so no job waits to compile.

    The largest pass goes first and gets a graph of its own (the usual chunk when a farm is busy),
    then one row, then the rest. From the second shape on, dynamo compiles graphs with a dynamic
    batch, which guards in diffusers' code bound (U-Net batches 16-63 share one, smaller ones
    another, in diffusers 0.42), so a few compiles cover every size; each size still runs once
    so that shape-specialised kernels and cuDNN's timings are ready before the first job.
    With `compile_cache_dir`, the graphs come from (and go to) the cache folder: the log says
    whether this start was warm or cold, and how long the warm-up took.
    """
    if model.family == "sdxl-refiner":
        # A refiner only finishes what a base starts: its first refined chunk compiles it.
        log.info("model %s: an SDXL refiner, not warmed up on its own", model.name)
        return
    cache = CompileCache.open(levers.compile_cache_dir)
    for width, height in levers.compile_sizes:
        key = cache_key(
            model.model_hash, device=_device_name(model.device), size=(width, height),
            rows=levers.warm_up_rows, backend=levers.compile_backend, mode=levers.compile_mode,
        )  # fmt: skip
        cold_s = cache.warm_s(key)  # what its cold compile took, if this folder saw one
        warm = cold_s is not None and cache.folder is not None
        if warm:
            log.info(
                "model %s: compile cache warm at %dx%d (compiling took %.0f s the first time)",
                model.name, width, height, cold_s,
            )  # fmt: skip
        else:
            log.info(
                "model %s: compile cache cold at %dx%d: compiling, about %.0f s",
                model.name, width, height, cold_estimate_s(model.family, 1),
            )  # fmt: skip
        started = time.perf_counter()
        with warming():
            _warm_size(model, levers, width, height)
        took = time.perf_counter() - started
        cache.record(key, took, warm=warm)
        log.info(
            "model %s: compile warm-up at %dx%d took %.1f s (compile cache %s)",
            model.name, width, height, took,
            "warm" if warm else ("cold" if cache.folder else "not kept: no compile_cache_dir"),
        )  # fmt: skip


def _device_name(device: torch.device) -> str:
    """Compiled kernels are the GPU's own: a cache from another kind of card is cold."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _warm_size(model: LoadedModel, levers: Levers, width: int, height: int) -> None:
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
            model.name, width, height, rows, time.perf_counter() - started,
        )  # fmt: skip


def rows_per_pass(model: LoadedModel, params: PassParams, max_pass_pixels: int | None) -> int:
    """How many rows of this size one pass may hold (at least 1; no limit on a CPU unless set)."""
    pixels = params.width * params.height
    if max_pass_pixels is not None:
        return max(1, max_pass_pixels // pixels)
    if model.device.type != "cuda":
        return 1 << 30  # host memory is the OS's to page; nothing to measure it against here
    scale = torch.finfo(model.dtype).bits / 16
    vae_scale = torch.finfo(model.vae.dtype).bits / 16  # SDXL's VAE runs in float32
    free, _total = torch.cuda.mem_get_info(model.device)
    # Blocks the caching allocator holds but no tensor uses are free for this pass too.
    free += torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)
    tile = (
        model.vae.tile_sample_min_size if model.vae.use_tiling else max(params.width, params.height)
    )
    vae = VAE_BYTES_PER_PIXEL * vae_scale * min(pixels, tile * tile)
    unet_bytes = UNET_BYTES_PER_PIXEL_ROW_BY_FAMILY.get(model.family, UNET_BYTES_PER_PIXEL_ROW)
    per_row = unet_bytes * scale * pixels
    if not model.vae.use_slicing:  # a whole pass decodes at once: the VAE's peak is per row too
        per_row, vae = per_row + vae, 0.0
    return max(1, int((free * MEMORY_HEADROOM - vae) // per_row))


def render_in_passes(
    model: LoadedModel,
    rows: Sequence[Row],
    params: PassParams,
    on_step: Callable[[int, int], None] | None = None,
    *,
    max_pass_pixels: int | None = None,
    refiner: LoadedModel | None = None,
) -> PassResult:
    """`render_pass`, split into passes that fit in memory; progress counts over all of them.

    With a refiner, a pass runs both U-Nets one after the other: it holds what the larger needs.
    """
    size = rows_per_pass(model, params, max_pass_pixels)
    if refiner is not None:
        size = min(size, rows_per_pass(refiner, params, max_pass_pixels))
    if len(rows) <= size:
        return render_pass(model, rows, params, on_step=on_step, refiner=refiner)
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
        result = render_pass(model, part, params, on_step=step_cb, refiner=refiner)
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
