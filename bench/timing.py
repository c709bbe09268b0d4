"""Timing a configuration of bench/gpu.py at two step counts, and what follows from the times."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from worker.models import LoadedModel
from worker.schedulers import make_scheduler

__all__ = ["measure", "scheduler_ms_per_step", "summarise"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object]) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def measure(
    device: torch.device, run: Callable[[int], object], steps: tuple[int, int]
) -> dict[str, float]:
    """Warm up (compiles, cuDNN timings), then time `run` at two step counts."""
    lo, hi = steps
    first_s = _timed(device, lambda: run(lo))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lo_s = _timed(device, lambda: run(lo))
    hi_s = _timed(device, lambda: run(hi))
    per_step = (hi_s - lo_s) / (hi - lo)
    out = {"warmup_s": first_s, "lo_s": lo_s, "hi_s": hi_s, "s_per_step": per_step}
    if per_step <= 0:  # a noisy host (a shared CPU): fall back to an upper bound
        out |= {"s_per_step": hi_s / hi, "noisy": True}
    out["fixed_s"] = max(lo_s - lo * per_step, 0.0)
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def scheduler_ms_per_step(model: LoadedModel, name: str, rows: int, size: int, steps: int) -> float:
    """Host time of a sampler's scale + step (LMS integrates its coefficients every step)."""
    scheduler = make_scheduler(name, model.scheduler_config)
    scheduler.set_timesteps(steps, device=model.device)
    latent = size // model.vae_scale_factor
    shape = (rows, model.unet.config.in_channels, latent, latent)
    latents = torch.randn(shape, device=model.device)  # float32, as the sampler steps
    noise = torch.randn_like(latents) * 0.01

    def loop() -> None:
        nonlocal latents
        for t in scheduler.timesteps:
            scheduler.scale_model_input(latents, t)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]

    return 1000 * _timed(model.device, loop) / steps


def summarise(
    result: dict[str, Any], image_tflop: float, peak_tflops: float, target_steps: int
) -> None:
    """Add the figures of an image of `target_steps` steps to a measured configuration."""
    image_s = (result["fixed_s"] + target_steps * result["s_per_step"]) / result["rows"]
    result["it_per_s"] = 1.0 / result["s_per_step"]
    result["target_steps"] = target_steps
    result[f"s_per_image_{target_steps}"] = image_s
    result[f"images_per_s_{target_steps}"] = 1.0 / image_s
    result["tflops"] = image_tflop / image_s
    result["peak_fraction"] = result["tflops"] / peak_tflops
