"""The models bench/gpu.py runs, one part each: what it builds, its size, rows and budgets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.sd15 import build_sd15, build_tiny
from bench.sdxl import build_sdxl, build_tiny_sdxl
from worker.models import LoadedModel

__all__ = ["MODELS", "Part", "build", "choose_parts"]

MODELS = ("sd15", "sdxl", "both")  # --model


@dataclass(frozen=True)
class Part:
    """One model's share of a run."""

    key: str  # "sd15" or "sdxl": each configuration's "model" in the JSON
    label: str  # the table's heading
    size: int  # px, square: the model's native size
    target_steps: int  # images/s are for images of this many steps
    batches: tuple[int, ...]  # the farm's rows per pass
    compile_reserve_s: float  # how long compiling one of its U-Net graphs may take
    issue_image_tflop: float | None  # the issue's figure for an image, where it gives one


def choose_parts(
    which: str,
    *,
    tiny: bool,
    batches: tuple[int, ...] | None,
    compile_reserve_s: float,
    sdxl_compile_reserve_s: float,
) -> list[Part]:
    """The parts `which` (one of MODELS) names, SD 1.5 first; `batches` replaces the rows."""
    if which not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {which!r}")
    sd15 = Part(
        key="sd15",
        label="tiny SD 1.5" if tiny else "SD 1.5 architecture, random weights, fp16",
        size=64 if tiny else 512,
        target_steps=50,
        batches=batches or ((1, 2) if tiny else (1, 4, 8, 16)),
        compile_reserve_s=compile_reserve_s,
        issue_image_tflop=83.0,  # 512x512, 50 steps with guidance
    )
    sdxl = Part(
        key="sdxl",
        label="tiny SDXL" if tiny else "SDXL 1.0 base architecture, random weights, fp16",
        size=64 if tiny else 1024,
        target_steps=30,  # SDXL's usual count (SD 1.5's images are 50)
        batches=batches or ((1, 2) if tiny else (1, 4, 8)),
        compile_reserve_s=sdxl_compile_reserve_s,
        issue_image_tflop=None,
    )
    return {"sd15": [sd15], "sdxl": [sdxl], "both": [sd15, sdxl]}[which]


def build(part: Part, tiny: bool, device: torch.device) -> LoadedModel:
    """The part's model: full size in fp16 with random weights, or the tests' tiny one."""
    if part.key == "sdxl":
        return build_tiny_sdxl(device) if tiny else build_sdxl(device, torch.float16)
    return build_tiny(device) if tiny else build_sd15(device, torch.float16)
