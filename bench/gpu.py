"""The GPU benchmark: SD 1.5 at 512x512 and SDXL at 1024x1024, diffusers against the farm's path.

    python bench/gpu.py                 # full-size SD 1.5, then SDXL: random weights, fp16 on CUDA
    python bench/gpu.py --model sdxl    # one of them (sd15, sdxl; both by default)
    python bench/gpu.py --tiny          # the tiny models on the CPU at 64x64 (CI keeps it working)
    python bench/gpu.py --parts sampling --levers cuda_graphs,lms_precompute   # some of it

For each model one run measures diffusers' pipeline (StableDiffusionPipeline, or
StableDiffusionXLPipeline) at batch 1, built from the same components, then the farm's
`render_pass` at 1, 4, 8 and 16 rows (SDXL: 1, 4 and 8), eager and then with the U-Net compiled
as `sdfarm worker --compile` does. Every configuration is timed at two step counts; the
difference gives the time per step and the rest the fixed cost (text encoders, VAE, setup), from
which the time of an image at 50 steps (SDXL: 30) is extrapolated. A time budget, shared by the
models in turn, skips what no longer fits (said so in the JSON and the table), and a watchdog
writes what was measured and exits if a compile overruns.

Then, on SD 1.5 (`--parts`): the lever matrix (bench/lever_matrix.py: each lever of
worker/levers.py on and off, the same jobs, under `levers` in the JSON) and `farm_e2e`
(bench/farm_e2e.py: the whole farm on the device over HTTP against diffusers batched by hand).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, not installed

import diffusers
import torch

from bench.flops import count_tflop
from bench.gpu_args import PART_BUDGET_S, parser
from bench.lever_matrix import print_levers, run_lever_matrix
from bench.parts import Part, build, choose_parts
from bench.record import Run, print_e2e, print_table
from bench.sd15 import sd15_pipeline
from bench.sdxl import diffusers_vae, sdxl_pipeline
from bench.timing import measure, scheduler_ms_per_step, summarise
from worker.levers import Levers, apply_levers
from worker.models import LoadedModel
from worker.passes import rows_per_pass
from worker.sampler import PassParams, PassResult, Row, render_pass
from worker.schedulers import make_scheduler

__all__ = ["count_tflop", "main"]

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry"
GUIDANCE = 7.5
SAMPLER = "lms"  # the farm's default (shared/jobs.py), for diffusers' pipelines too
# SD 1.5's top-level keys, as before SDXL joined; every model's are also under "models".
SD15_TOP_LEVEL = ("size", "build_s", "flops", "rows_per_pass_estimate")


@dataclass
class Bench:
    """One model's benchmark: what it measures with, until when, and where it writes."""

    args: argparse.Namespace
    part: Part
    device: torch.device
    model: LoadedModel
    run: Run
    started: float  # the run's start (monotonic)
    deadline: float  # start nothing of this part's after this (monotonic)
    steps: tuple[int, int]
    image_tflop: float

    def over_budget(self, reserve_s: float = 0.0) -> bool:
        return time.monotonic() + reserve_s > self.deadline

    def record(self, result: dict[str, Any]) -> None:
        n = self.part.target_steps
        summarise(result, self.image_tflop, self.args.peak_tflops, n)
        self.run.add("configs", result)
        elapsed = time.monotonic() - self.started
        print(
            f"[{elapsed:5.0f} s] {self.part.key} {result['engine']} x{result['rows']} "
            f"compiled={result['compiled']}: {result['it_per_s']:.2f} it/s, "
            f"{result[f'images_per_s_{n}']:.3f} img/s at {n} steps "
            f"(warm-up {result['warmup_s']:.1f} s)",
            flush=True,
        )

    def diffusers_pipeline(self) -> None:
        """diffusers' pipeline at batch 1, before the farm's levers touch the modules."""
        m, size = self.model, self.part.size
        scheduler = make_scheduler(SAMPLER, m.scheduler_config)
        with diffusers_vae(m):
            if self.part.key == "sdxl":
                pipe = sdxl_pipeline(m, scheduler)
            else:
                pipe = sd15_pipeline(m, scheduler)

            def pipeline(n: int) -> object:
                generator = torch.Generator("cpu").manual_seed(0)
                return pipe(
                    [PROMPT], negative_prompt=[NEGATIVE], height=size, width=size,
                    num_inference_steps=n, generator=generator, guidance_scale=GUIDANCE,
                    output_type="np",
                )  # fmt: skip

            result = {"model": self.part.key, "engine": "diffusers", "rows": 1, "compiled": False}
            result |= measure(self.device, pipeline, self.steps)
        self.record(result)

    def farm(self, *, compiled: bool) -> None:
        """The farm's sampling path at each batch size, eager or with the U-Net compiled."""
        # Compiled: batch 1 first (a static graph, as the published anchors are), then 8 and 16,
        # then 4: the second shape makes dynamo compile a graph with a dynamic batch, which guards
        # in diffusers' code bound (U-Net batches 16-63 in 0.42: 8 and 16 rows), so 4 rows need
        # a third graph, and go last. SDXL's U-Net has the same guards.
        batches, size, key = self.part.batches, self.part.size, self.part.key
        order = sorted(batches, key=lambda b: (b != 1, b < 8, b)) if compiled else list(batches)
        if compiled and self.args.tiny:
            order = order[:1]  # CI checks the compiled path; more graphs cost minutes on a CPU
        for index, rows in enumerate(order):
            new_graph = compiled and (index == 1 or (index > 1 and 2 * rows < 16))
            reserve = self.part.compile_reserve_s if new_graph else 0.0
            if self.over_budget(reserve):
                skip = {"model": key, "compiled": compiled, "rows": rows, "why": "time budget"}
                self.run.add("skipped", skip)
                continue
            batch = [Row(f"{PROMPT} {i}", NEGATIVE, seed=i, guidance=GUIDANCE) for i in range(rows)]
            last: list[PassResult] = []

            def render(n: int, batch: list[Row] = batch, last: list[PassResult] = last) -> object:
                params = PassParams(n, size, size, scheduler=SAMPLER)
                last[:] = [render_pass(self.model, batch, params)]
                return last[0]

            result: dict[str, Any] = {"model": key, "engine": "farm", "rows": rows}
            result["compiled"] = compiled
            if compiled:
                result["graph"] = "static" if index == 0 else "dynamic batch"
            result |= measure(self.device, render, self.steps)
            host_ms = scheduler_ms_per_step(self.model, SAMPLER, rows, size, self.part.target_steps)
            result[f"{SAMPLER}_host_ms_per_step"] = host_ms
            # Random weights in fp16 could overflow; a decode retried in fp32 would skew the VAE.
            result["vae_fp32_retries"] = sum(1 for w in last[0].warnings if w)
            result["failed_rows"] = sum(1 for e in last[0].errors if e)
            self.record(result)


def run_part(
    args: argparse.Namespace,
    part: Part,
    device: torch.device,
    run: Run,
    *,
    started: float,
    deadline: float,
) -> None:
    """Build one model, count its FLOPs, then time diffusers and the farm, eager and compiled."""
    steps = _timed_steps(args.tiny)
    backend = "eager" if args.tiny else "inductor"  # eager only traces: seconds on a CPU

    def fact(key: str, value: Any) -> None:
        run.add_fact(part.key, key, value)
        if part.key == "sd15" and key in SD15_TOP_LEVEL:
            run.add(key, value)

    fact("label", part.label)
    fact("size", f"{part.size}x{part.size}")
    fact("target_steps", part.target_steps)
    built = time.monotonic()
    model = build(part, args.tiny, device)
    fact("build_s", time.monotonic() - built)
    flops: dict[str, float] = count_tflop(model, part.size, part.target_steps)
    if part.issue_image_tflop is not None:
        flops["issue_image_tflop"] = part.issue_image_tflop
    fact("flops", flops)
    counted = flops["unet_step_tflop"] > 0
    image_tflop = flops["image_tflop"] if counted else (part.issue_image_tflop or 0.0)
    bench = Bench(args, part, device, model, run, started, deadline, steps, image_tflop)

    if "sampling" in args.parts:
        bench.diffusers_pipeline()
        # The farm's levers (worker/levers.py) as a worker applies them at start, eager first.
        apply_levers(model, Levers())
        params = PassParams(2, part.size, part.size)
        fact("rows_per_pass_estimate", rows_per_pass(model, params, None))
        bench.farm(compiled=False)
        if args.no_compile or bench.over_budget(part.compile_reserve_s):
            run.add("skipped", {"model": part.key, "compiled": True, "why": _why(args)})
        else:
            model.unet.compile(backend=backend)  # what levers.apply_levers does for --compile
            bench.farm(compiled=True)
    if part.key != "sd15":
        return
    if "levers" in args.parts and args.levers:
        lever_deadline = time.monotonic() + args.lever_budget_s
        matrix = run_lever_matrix(
            model, args.levers, rows=args.lever_rows or (1 if args.tiny else 8),
            size=part.size, steps=steps, target_steps=part.target_steps,
            image_tflop=image_tflop, peak_tflops=args.peak_tflops, compile_backend=backend,
            over_budget=lambda reserve: time.monotonic() + reserve > lever_deadline,
            report=lambda figures: run.add("levers", figures),
        )  # fmt: skip
        run.add("levers", matrix)
    if "farm_e2e" in args.parts:
        # Here, not at the top: the farm needs the whole project (Redis, Celery, the API), the
        # rest of this script only torch and diffusers.
        from bench.farm_e2e import run_farm_e2e, setup_for

        del bench, model  # the worker and diffusers load their own copies
        gc.collect()
        e2e = run_farm_e2e(
            setup_for(args.tiny, args.e2e_jobs), device, flops["unet_step_tflop"],
            flops["vae_decode_tflop"], args.peak_tflops, compiled=not args.no_compile,
            report=lambda figures: run.add("farm_e2e", figures),
        )  # fmt: skip
        run.add("farm_e2e", e2e)


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    started = time.monotonic()
    device = torch.device("cpu" if args.tiny else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on a CPU")
    chosen = choose_parts(
        args.model,
        tiny=args.tiny,
        batches=args.batches,
        compile_reserve_s=args.compile_reserve_s,
        sdxl_compile_reserve_s=args.sdxl_compile_reserve_s,
    )
    budget_s = args.budget_s if args.budget_s is not None else PART_BUDGET_S * len(chosen)
    out = args.out or _default_out(args.tiny)
    run = Run(out, _meta(args, device, chosen, budget_s))
    _start_watchdog(run, budget_s + args.lever_budget_s + args.e2e_budget_s + args.grace_s)

    for index, part in enumerate(chosen):
        # Each model's share of the budget ends here; what one leaves goes to the next.
        deadline = started + budget_s * (index + 1) / len(chosen)
        run_part(args, part, device, run, started=started, deadline=deadline)
        torch.compiler.reset()  # the next U-Net starts with no graphs, as a fresh worker does
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    run.add("total_s", time.monotonic() - started)
    print_table(run.data)
    if "levers" in run.data:
        print_levers(run.data["levers"], chosen[0].target_steps)
    if "farm_e2e" in run.data:
        print_e2e(run.data["farm_e2e"])
    print(f"wrote {out}")
    return 0


def _timed_steps(tiny: bool) -> tuple[int, int]:
    """The two step counts every configuration is timed at."""
    return (2, 4) if tiny else (2, 12)


def _why(args: argparse.Namespace) -> str:
    return "--no-compile" if args.no_compile else "time budget (compiling would not fit)"


def _default_out(tiny: bool) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    name = f"gpu-tiny-{stamp}.json" if tiny else f"gpu-{stamp}.json"
    return Path(__file__).resolve().parent / "results" / name


def _meta(
    args: argparse.Namespace, device: torch.device, chosen: list[Part], budget_s: float
) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    steps = _timed_steps(args.tiny)
    names = {"sd15": "SD 1.5", "sdxl": "SDXL"}
    targets = ", ".join(f"{p.target_steps} steps for {names[p.key]}" for p in chosen)
    return {
        "model": "; ".join(p.label for p in chosen),
        "device": name or "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "compile_backend": "eager" if args.tiny else "inductor",
        "peak_tflops": args.peak_tflops,
        "budget_s": budget_s,
        "sampler": SAMPLER,
        "method": (
            f"each configuration warmed up, then timed at {steps[0]} and {steps[1]} steps; "
            f"time per step = difference / {steps[1] - steps[0]}, fixed cost = the rest; "
            f"images/s are extrapolated to {targets}; TFLOP/s = FLOPs counted by "
            "torch.utils.flop_counter for one image / seconds per image"
        ),
    }


def _start_watchdog(run: Run, limit_s: float) -> None:
    def expire() -> None:
        run.add("aborted", f"still running after {limit_s:.0f} s (a compile overran): exited")
        print_table(run.data)
        sys.stdout.flush()
        os._exit(3)

    timer = threading.Timer(limit_s, expire)
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    sys.exit(main())
