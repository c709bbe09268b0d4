"""The baselines the farm is measured against: diffusers' own pipeline, in this process.

The same jobs as the farm's (prompt, negative prompt, seed, size, steps, guidance, LMS), rendered
by `StableDiffusionPipeline` loaded from the same model folder: one job per call, as a script
looping over prompts would, and `max_batch` jobs per call, as someone batching by hand would
(one CPU generator per image, so each image is still its own seed's). Like the farm's, each job
ends as a PNG file: the script writes every image to a folder, and the time that took is
recorded apart (`save_s`), so the render alone can be read off too.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from worker.models import quiet_hf_progress_bars

__all__ = ["DirectPipeline", "Job"]


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


class DirectPipeline:
    """diffusers' pipeline loaded once from the model folder; each method times one pass."""

    def __init__(
        self,
        model_dir: Path,
        warm_up: Sequence[Job],
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.save_s = 0.0  # writing PNG files, within the times the methods return
        diffusers_logging.disable_progress_bar()  # the component-loading bar
        with quiet_hf_progress_bars():
            self.pipe = StableDiffusionPipeline.from_pretrained(
                model_dir, safety_checker=None, requires_safety_checker=False,
                local_files_only=True, torch_dtype=dtype,
            ).to(device)  # fmt: skip
        self.pipe.set_progress_bar_config(disable=True)  # a fair baseline draws no progress bars
        # First-call costs (allocations, lazy inits) are not the jobs': one call of each shape.
        self._render(warm_up[:1])
        self._render(warm_up)

    def one_by_one(self, jobs: Sequence[Job]) -> float:
        """Seconds to render `jobs` one call each."""
        return self._timed([[job] for job in jobs])

    def batched(self, jobs: Sequence[Job], max_batch: int) -> float:
        """Seconds to render `jobs` `max_batch` a call."""
        return self._timed([jobs[i : i + max_batch] for i in range(0, len(jobs), max_batch)])

    def _timed(self, calls: Sequence[Sequence[Job]]) -> float:
        self.save_s = 0.0
        with tempfile.TemporaryDirectory(prefix="sdfarm-direct-") as folder:
            started = time.perf_counter()
            for jobs in calls:
                self._render(jobs, Path(folder))
            return time.perf_counter() - started

    def _render(self, jobs: Sequence[Job], folder: Path | None = None) -> None:
        first = jobs[0]
        with torch.inference_mode():
            images = self.pipe(
                prompt=[j.prompt for j in jobs],
                negative_prompt=[j.negative_prompt for j in jobs],
                height=first.height,
                width=first.width,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance,
                generator=[torch.Generator().manual_seed(j.seed) for j in jobs],
            ).images
        if folder is not None:
            started = time.perf_counter()
            for job, image in zip(jobs, images, strict=True):
                image.save(folder / f"{job.seed}.png")
            self.save_s += time.perf_counter() - started
