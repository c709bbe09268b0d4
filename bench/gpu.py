"""The GPU benchmark: SD 1.5 at 512x512, diffusers' pipeline against the farm's sampling path.

    python bench/gpu.py                 # full-size SD 1.5, random weights, fp16 on CUDA
    python bench/gpu.py --tiny          # the tiny model on the CPU at 64x64 (CI keeps it working)

One run measures diffusers' StableDiffusionPipeline at batch 1 (built from the same components),
then the farm's `render_pass` at 1, 4, 8 and 16 rows, eager and then with the U-Net compiled as
`sdfarm worker --compile` does. Every configuration is timed at two step counts; the difference
gives the time per step and the rest the fixed cost (text encoder, VAE, setup), from which the
time of an image at 50 steps is extrapolated. A time budget skips what no longer fits (said so in
the JSON and the table), and a watchdog writes what was measured and exits if a compile overruns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, not installed

import diffusers
import torch
from diffusers import StableDiffusionPipeline
from torch.utils.flop_counter import FlopCounterMode

from bench.sd15 import build_sd15, build_tiny, scheduler_for
from worker.levers import Levers, apply_levers
from worker.models import LoadedModel
from worker.passes import rows_per_pass
from worker.sampler import PassParams, PassResult, Row, render_pass
from worker.schedulers import make_scheduler

ISSUE_IMAGE_TFLOP = 83.0  # the issue's figure for SD 1.5, 512x512, 50 steps with guidance
TARGET_STEPS = 50  # images/s are reported for 50-step images
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


class Run:
    """The results so far; written after every configuration, so a killed run still reports."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {**meta, "configs": [], "skipped": []}
        self.lock = threading.Lock()

    def add(self, key: str, value: Any) -> None:
        with self.lock:
            if isinstance(self.data.get(key), list):
                self.data[key].append(value)
            else:
                self.data[key] = value
            self.write()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".partial")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.out)


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


def count_tflop(model: LoadedModel, size: int) -> dict[str, float]:
    """FLOPs of one guided U-Net step for one image, and of one VAE decode, counted by torch."""
    latent = size // model.vae_scale_factor
    x = torch.randn(2, 4, latent, latent, device=model.device, dtype=model.dtype)
    states = torch.randn(2, 77, model.unet.config.cross_attention_dim, device=model.device)
    t = torch.tensor(500.0, device=model.device)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model.unet(x, t, encoder_hidden_states=states.to(model.dtype), return_dict=False)
        unet = counter.get_total_flops() / 1e12
        counter = FlopCounterMode(display=False)
        with counter:
            model.vae.decode(x[:1], return_dict=False)
        vae = counter.get_total_flops() / 1e12
    return {
        "unet_step_tflop": unet,
        "vae_decode_tflop": vae,
        "image_tflop": TARGET_STEPS * unet + vae,
    }


def scheduler_ms_per_step(model: LoadedModel, rows: int, size: int) -> float:
    """Host time of LMS's scale + step (scipy integrates its coefficients every step)."""
    scheduler = make_scheduler("lms", model.scheduler_config)
    scheduler.set_timesteps(TARGET_STEPS, device=model.device)
    shape = (rows, 4, size // 8, size // 8)
    latents = torch.randn(shape, device=model.device)  # float32, as the sampler steps
    noise = torch.randn_like(latents) * 0.01

    def loop() -> None:
        nonlocal latents
        for t in scheduler.timesteps:
            scheduler.scale_model_input(latents, t)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]

    return 1000 * _timed(model.device, loop) / TARGET_STEPS


def _summarise(result: dict[str, Any], rows: int, image_tflop: float, peak: float) -> None:
    image_s = (result["fixed_s"] + TARGET_STEPS * result["s_per_step"]) / rows
    result["it_per_s"] = 1.0 / result["s_per_step"]
    result["s_per_image_50"] = image_s
    result["images_per_s_50"] = 1.0 / image_s
    result["tflops"] = image_tflop / image_s
    result["peak_fraction"] = result["tflops"] / peak


@dataclass
class Bench:
    """One benchmark run: what it measures with, and where it writes."""

    args: argparse.Namespace
    device: torch.device
    model: LoadedModel
    run: Run
    started: float
    size: int
    steps: tuple[int, int]
    image_tflop: float

    def over_budget(self, reserve_s: float = 0.0) -> bool:
        return time.monotonic() - self.started + reserve_s > float(self.args.budget_s)

    def record(self, result: dict[str, Any]) -> None:
        _summarise(result, result["rows"], self.image_tflop, self.args.peak_tflops)
        self.run.add("configs", result)
        elapsed = time.monotonic() - self.started
        print(
            f"[{elapsed:5.0f} s] {result['engine']} x{result['rows']} "
            f"compiled={result['compiled']}: {result['it_per_s']:.2f} it/s, "
            f"{result['images_per_s_50']:.3f} img/s at {TARGET_STEPS} steps "
            f"(warm-up {result['warmup_s']:.1f} s)",
            flush=True,
        )

    def diffusers_pipeline(self) -> None:
        """diffusers' pipeline at batch 1, before the farm's levers touch the modules."""
        m, size = self.model, self.size
        pipe = StableDiffusionPipeline(
            vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
            scheduler=scheduler_for(m), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)

        def pipeline(n: int) -> object:
            generator = torch.Generator("cpu").manual_seed(0)
            return pipe(
                [PROMPT], height=size, width=size, num_inference_steps=n, generator=generator,
                guidance_scale=7.5, output_type="np",
            )  # fmt: skip

        result = {"engine": "diffusers", "rows": 1, "compiled": False}
        self.record(result | measure(self.device, pipeline, self.steps))

    def farm(self, batches: list[int], *, compiled: bool) -> None:
        """The farm's sampling path at each batch size, eager or with the U-Net compiled."""
        # Compiled: batch 1 first (a static graph, as the published anchors are), then 8, 16, 4:
        # the second shape makes dynamo compile a graph with a dynamic batch, which guards in
        # diffusers' code bound (U-Net batches 16-63 in 0.42: 8 and 16 rows), so 4 rows need a
        # third graph, and go last.
        order = sorted(batches, key=lambda b: (b != 1, b < 8, b)) if compiled else batches
        if compiled and self.args.tiny:
            order = order[:1]  # CI checks the compiled path; more graphs cost minutes on a CPU
        for index, rows in enumerate(order):
            new_graph = compiled and (index == 1 or (index > 1 and 2 * rows < 16))
            reserve = self.args.compile_reserve_s if new_graph else 0.0
            if self.over_budget(reserve):
                self.run.add("skipped", {"compiled": compiled, "rows": rows, "why": "time budget"})
                continue
            batch = [Row(f"{PROMPT} {i}", "blurry", seed=i, guidance=7.5) for i in range(rows)]
            last: list[PassResult] = []

            def render(n: int, batch: list[Row] = batch, last: list[PassResult] = last) -> object:
                last[:] = [render_pass(self.model, batch, PassParams(n, self.size, self.size))]
                return last[0]

            result: dict[str, Any] = {"engine": "farm", "rows": rows, "compiled": compiled}
            if compiled:
                result["graph"] = "static" if index == 0 else "dynamic batch"
            result |= measure(self.device, render, self.steps)
            result["lms_host_ms_per_step"] = scheduler_ms_per_step(self.model, rows, self.size)
            # Random weights in fp16 could overflow; a decode retried in fp32 would skew the VAE.
            result["vae_fp32_retries"] = sum(1 for w in last[0].warnings if w)
            result["failed_rows"] = sum(1 for e in last[0].errors if e)
            self.record(result)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.monotonic()
    device = torch.device("cpu" if args.tiny else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on a CPU")
    size = 64 if args.tiny else 512
    steps = (2, 4) if args.tiny else (2, 12)
    batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,4,8,16")).split(",")]
    backend = "eager" if args.tiny else "inductor"  # eager only traces: seconds on a CPU
    out = args.out or _default_out(args.tiny)
    run = Run(out, _meta(args, device, size, steps, backend))
    _start_watchdog(run, args.budget_s + args.grace_s)

    model = build_tiny(device) if args.tiny else build_sd15(device, torch.float16)
    run.add("build_s", time.monotonic() - started)
    flops = count_tflop(model, size)
    run.add("flops", {**flops, "issue_image_tflop": ISSUE_IMAGE_TFLOP})
    image_tflop = flops["image_tflop"] if flops["unet_step_tflop"] > 0 else ISSUE_IMAGE_TFLOP
    bench = Bench(args, device, model, run, started, size, steps, image_tflop)

    bench.diffusers_pipeline()
    # The farm's levers (worker/levers.py) as a worker applies them at start, eager first.
    apply_levers(model, Levers())
    run.add("rows_per_pass_estimate", rows_per_pass(model, PassParams(2, size, size), None))
    bench.farm(batches, compiled=False)
    if args.no_compile or bench.over_budget(args.compile_reserve_s):
        run.add("skipped", {"compiled": True, "why": _why(args)})
    else:
        model.unet.compile(backend=backend)  # what levers.apply_levers does for --compile
        bench.farm(batches, compiled=True)
    run.add("total_s", time.monotonic() - started)
    _print_table(run.data)
    print(f"wrote {out}")
    return 0


def _why(args: argparse.Namespace) -> str:
    return "--no-compile" if args.no_compile else "time budget (compiling would not fit)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU, 64x64")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/gpu-DATE.json)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", help="rows per pass for the farm (1,4,8,16; tiny: 1,2)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled runs")
    p.add_argument("--budget-s", type=float, default=210.0, help="start nothing new after this")
    p.add_argument("--grace-s", type=float, default=30.0, help="then this long before exiting")
    p.add_argument(
        "--compile-reserve-s", type=float, default=75.0, help="time a U-Net compile may take"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=790.0, help="the device's dense fp16 peak (H200)"
    )
    return p


def _default_out(tiny: bool) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    name = f"gpu-tiny-{stamp}.json" if tiny else f"gpu-{stamp}.json"
    return Path(__file__).resolve().parent / "results" / name


def _meta(
    args: argparse.Namespace, device: torch.device, size: int, steps: tuple[int, int], backend: str
) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "model": "tiny" if args.tiny else "SD 1.5 architecture, random weights, fp16",
        "device": name or "cpu",
        "size": f"{size}x{size}",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "compile_backend": backend,
        "peak_tflops": args.peak_tflops,
        "method": (
            f"each configuration warmed up, then timed at {steps[0]} and {steps[1]} steps; "
            f"time per step = difference / {steps[1] - steps[0]}, fixed cost = the rest; "
            f"images/s are extrapolated to {TARGET_STEPS} steps; TFLOP/s = FLOPs counted by "
            "torch.utils.flop_counter for one image / seconds per image"
        ),
    }


def _start_watchdog(run: Run, limit_s: float) -> None:
    def expire() -> None:
        run.add("aborted", f"still running after {limit_s:.0f} s (a compile overran): exited")
        _print_table(run.data)
        sys.stdout.flush()
        os._exit(3)

    timer = threading.Timer(limit_s, expire)
    timer.daemon = True
    timer.start()


def _print_table(data: dict[str, Any]) -> None:
    print(f"\n{data['model']} on {data['device']}, {data['size']}, torch {data['torch']}")
    head = f"{'engine':9} {'rows':>4} {'compiled':>14} {'it/s':>7} {'img/s@50':>9} "
    print(head + f"{'s/img':>7} {'TFLOP/s':>8} {'peak%':>6} {'mem GiB':>7} {'warmup s':>8}")
    for c in data["configs"]:
        kind = c.get("graph", "yes") if c["compiled"] else "no"
        print(
            f"{c['engine']:9} {c['rows']:>4} {kind:>14} {c['it_per_s']:>7.2f} "
            f"{c['images_per_s_50']:>9.3f} {c['s_per_image_50']:>7.3f} {c['tflops']:>8.1f} "
            f"{100 * c['peak_fraction']:>5.1f}% {c.get('peak_mem_gib', 0):>7.2f} "
            f"{c['warmup_s']:>8.1f}"
        )
    for s in data["skipped"]:
        print(f"skipped: {s}")
    if "flops" in data:
        f = data["flops"]
        print(
            f"FLOPs counted: U-Net step {f['unet_step_tflop']:.3f} TFLOP, VAE decode "
            f"{f['vae_decode_tflop']:.3f}, image at {TARGET_STEPS} steps {f['image_tflop']:.1f} "
            f"(the issue says {f['issue_image_tflop']:.0f})"
        )
    print(data["method"])
    if "aborted" in data:
        print(f"ABORTED: {data['aborted']}")


if __name__ == "__main__":
    sys.exit(main())
