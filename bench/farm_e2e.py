"""bench/gpu.py's `farm_e2e` part: the whole farm on the device, against diffusers batched by hand.

On the device, in one run: a model folder (SD 1.5's architecture with random weights, saved as
diffusers saves it; `--tiny`: the tests' tiny model), then diffusers' StableDiffusionPipeline
loaded from it, `max_batch` jobs a call (bench/direct.py); then the farm (bench/farm.py: Redis,
`sdfarm api` with file storage, one `sdfarm worker --device DEVICE`) renders the same jobs over
HTTP, first eager, then with `--compile`, restarted once on its compile cache. Reported: images/s
(POST to the last image stored), the ratio to diffusers on the same jobs, the GPU's busy share
(nvidia-smi, while the farm renders; None without it), each worker's ready time (start to
serving: cold, and for the compiled one warm, from its compile cache) and the share of the
device's peak that the images/s come to (None on a CPU).
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.direct import DirectPipeline, Job
from bench.farm import BenchFarm
from bench.gpu_busy import GpuBusy
from bench.sd15 import SCHEDULER_CONFIG, build_sd15, sd15_pipeline
from worker.tiny import make_tiny

__all__ = ["E2E_FIELDS", "E2eSetup", "run_farm_e2e", "setup_for"]

# What `farm_e2e` holds for each engine (eager, compiled), as tests/test_bench_gpu.py checks.
E2E_FIELDS = (
    "images_per_s",
    "ratio_to_diffusers_batched",
    "gpu_busy_share",
    "ready_s",
    "share_of_peak",
)


@dataclass(frozen=True)
class E2eSetup:
    """The jobs of a farm_e2e run and the farm's settings for them."""

    jobs: int
    size: int
    steps: int
    max_batch: int
    compile_backend: str


def setup_for(tiny: bool, jobs: int | None) -> E2eSetup:
    if tiny:  # the same phases, as short as they go: one row a pass, so one graph to trace
        return E2eSetup(jobs or 4, 64, 2, 1, "eager")
    return E2eSetup(jobs or 96, 512, 30, 8, "inductor")


def run_farm_e2e(
    setup: E2eSetup, device: torch.device, unet_step_tflop: float, vae_tflop: float,
    peak_tflops: float, *, compiled: bool = True,
    report: Callable[[dict[str, Any]], None] = lambda figures: None,
) -> dict[str, Any]:  # fmt: skip
    """The part's figures, under "eager" and "compiled", and what both share; `report` gets
    them after each engine, so a run cut short keeps what it measured."""
    with tempfile.TemporaryDirectory(prefix="sdfarm-e2e-") as tmp:
        root = Path(tmp)
        model_dir = _model_folder(root, device)
        jobs = _jobs(setup, setup.jobs, first_seed=1000)
        warm = _jobs(setup, setup.max_batch, first_seed=1)
        diffusers_s = _diffusers_batched(model_dir, device, setup, jobs, warm)
        image_tflop = setup.steps * unet_step_tflop + vae_tflop
        out: dict[str, Any] = {
            "jobs": setup.jobs, "size": f"{setup.size}x{setup.size}", "steps": setup.steps,
            "max_batch": setup.max_batch, "storage": "file", "device": device.type,
            "diffusers_batched_images_per_s": setup.jobs / diffusers_s,
        }  # fmt: skip
        env = {
            "SDFARM_COMPILE_BACKEND": setup.compile_backend,
            "SDFARM_COMPILE_SIZES": f"{setup.size}x{setup.size}",
            "SDFARM_COMPILE_CACHE_DIR": str(root / "compile-cache"),
        }
        farm = BenchFarm(
            root / "farm", model_dir, setup.max_batch, "file",
            device=device.type, model_name="e2e", extra_env=env,
        )  # fmt: skip
        with farm:
            engines = [("eager", False)] + ([("compiled", True)] if compiled else [])
            for name, compile_unet in engines:
                ready = {"cold": farm.ready_s}
                if compile_unet:
                    farm.stop_worker()
                    ready = {"cold": farm.start_worker(compile_unet=True)}
                result = _farm_run(farm, jobs, warm)
                if compile_unet:  # a restart on the same machine: from the compile cache
                    farm.stop_worker()
                    ready["warm"] = farm.start_worker(compile_unet=True)
                images_per_s = result.pop("images_per_s")
                out[name] = {
                    "images_per_s": images_per_s,
                    "ratio_to_diffusers_batched": images_per_s * diffusers_s / setup.jobs,
                    "gpu_busy_share": result.pop("gpu_busy_share"),
                    "ready_s": ready,
                    "share_of_peak": (
                        images_per_s * image_tflop / peak_tflops if device.type == "cuda" else None
                    ),
                    **result,
                }
                report(out)
    return out


def _farm_run(farm: BenchFarm, jobs: list[Job], warm: list[Job]) -> dict[str, Any]:
    farm.warm_up(warm)  # a farm that has been running: first-call costs paid
    with GpuBusy() as busy:
        run = farm.run(jobs)
    return {
        "images_per_s": run["farm_images_per_s"],
        "gpu_busy_share": busy.share(),
        "farm_s": run["farm_s"],
        "overhead_share": run["overhead_share"],
        "mean_rows_per_pass": run["mean_rows_per_pass"],
    }


def _diffusers_batched(
    model_dir: Path, device: torch.device, setup: E2eSetup, jobs: list[Job], warm: list[Job]
) -> float:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    direct = DirectPipeline(model_dir, warm, device=str(device), dtype=dtype)
    seconds = direct.batched(jobs, setup.max_batch)
    del direct
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the farm's worker gets the memory back
    return seconds


def _model_folder(root: Path, device: torch.device) -> Path:
    """A diffusers model folder the worker and diffusers both load."""
    if device.type != "cuda":
        return make_tiny(root / "tiny")
    started = time.monotonic()
    model = build_sd15(device, torch.float16)
    from diffusers import LMSDiscreteScheduler

    pipe = sd15_pipeline(model, LMSDiscreteScheduler.from_config(SCHEDULER_CONFIG))
    folder = root / "sd15-random"
    pipe.save_pretrained(folder)
    del pipe, model
    gc.collect()
    torch.cuda.empty_cache()
    print(f"farm_e2e: SD 1.5 (random weights) saved in {time.monotonic() - started:.0f} s")
    return folder


def _jobs(setup: E2eSetup, count: int, *, first_seed: int) -> list[Job]:
    return [
        Job(
            prompt=f"a lighthouse on a cliff at dusk, oil painting {i}",
            negative_prompt="blurry",
            seed=first_seed + i,
            width=setup.size,
            height=setup.size,
            steps=setup.steps,
            guidance=7.5,
        )
        for i in range(count)
    ]
