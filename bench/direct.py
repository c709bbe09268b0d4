"""The baselines the farm is measured against: diffusers' own pipeline, in this process.

The same jobs as the farm's (prompt, negative prompt, seed, size, steps, guidance, LMS), rendered
by `StableDiffusionPipeline` loaded from the same model folder: one job per call, as a script
looping over prompts would, and `max_batch` jobs per call, as someone batching by hand would
(one CPU generator per image, so each image is still its own seed's).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from worker.models import quiet_hf_progress_bars

__all__ = ["Job", "render_direct"]


@dataclass(frozen=True)
class Job:
    """One image to render, as the farm receives it."""

    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float

    def farm_spec(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
        }


def _render(pipe: Any, jobs: Sequence[Job]) -> None:
    first = jobs[0]
    pipe(
        prompt=[j.prompt for j in jobs],
        negative_prompt=[j.negative_prompt for j in jobs],
        height=first.height,
        width=first.width,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance,
        generator=[torch.Generator().manual_seed(j.seed) for j in jobs],
    )


def render_direct(
    model_dir: Path, jobs: Sequence[Job], max_batch: int, repeats: int = 1
) -> dict[str, float]:
    """Images/s of diffusers' pipeline on `jobs`, one by one and `max_batch` a call (best run)."""
    diffusers_logging.disable_progress_bar()  # the component-loading bar
    with quiet_hf_progress_bars():
        pipe = StableDiffusionPipeline.from_pretrained(
            model_dir, safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
    pipe.set_progress_bar_config(disable=True)  # a fair baseline draws no progress bars
    one_by_one_s = batched_s = float("inf")
    with torch.inference_mode():
        _render(pipe, jobs[:1])  # first-call costs (allocations, lazy inits) are not the jobs'
        _render(pipe, jobs[:max_batch])
        for _ in range(repeats):
            started = time.perf_counter()
            for job in jobs:
                _render(pipe, [job])
            one_by_one_s = min(one_by_one_s, time.perf_counter() - started)
            started = time.perf_counter()
            for i in range(0, len(jobs), max_batch):
                _render(pipe, jobs[i : i + max_batch])
            batched_s = min(batched_s, time.perf_counter() - started)
    return {
        "one_by_one_s": one_by_one_s,
        "one_by_one_images_per_s": len(jobs) / one_by_one_s,
        "batched_s": batched_s,
        "batched_images_per_s": len(jobs) / batched_s,
    }
