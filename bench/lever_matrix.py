"""bench/gpu.py's lever matrix: each speed lever measured on and off, the same jobs, one run.

Every lever of worker/levers.py that can change images/s is one row: the farm's `render_pass`
at a fixed number of rows with today's defaults (`Levers()`, the baseline: off) and with only
that lever changed (on), each timed as every configuration is (bench/timing.py: warmed up, two
step counts). A lever whose compiled runs need a graph is measured with the U-Net compiled both
ways. `gain` is on / off; `keep` says whether it helped by more than the noise of a run
(KEEP_ABOVE). Levers that only act on CUDA are skipped on a CPU, and any lever that would not
fit the time left is skipped, with the reason.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.timing import measure, summarise
from worker.levers import Levers, apply_levers
from worker.models import LoadedModel
from worker.sampler import PassParams, Row, render_pass

__all__ = ["LEVERS", "Lever", "choose_levers", "print_levers", "run_lever_matrix"]

KEEP_ABOVE = 1.03  # on / off: what a lever must beat to count as a gain (runs vary ~1-2 %)


@dataclass(frozen=True)
class Lever:
    """One row of the matrix: what `on` changes from the baseline."""

    name: str
    on: dict[str, Any]
    cuda_only: bool = True
    compiled: bool = False  # both sides with the U-Net compiled (the lever is about compiling)
    reserve_s: float = 20.0  # time both sides may take on a GPU (compiles: two graphs)


LEVERS: tuple[Lever, ...] = (
    Lever("channels_last", {"channels_last": False}),  # on today: "on" is off, see `inverted`
    Lever("cudnn_benchmark", {"cudnn_benchmark": False}),
    Lever("vae_whole_decode", {"vae_slicing": "auto"}),
    Lever("attention_flash", {"attention_backend": "flash"}),
    Lever("attention_cudnn", {"attention_backend": "cudnn"}),
    Lever("attention_auto", {"attention_backend": "auto"}),
    Lever("lms_precompute", {"lms_precompute": True}, cuda_only=False),
    Lever("compile_unet", {"compile_unet": True}, reserve_s=90.0),  # a CPU's: bench/gpu.py's own
    Lever("compile_vae", {"compile_unet": True, "compile_vae": True}, False, True, 150.0),
    Lever("cuda_graphs", {"compile_mode": "reduce-overhead"}, compiled=True, reserve_s=150.0),
    Lever("max_autotune", {"compile_mode": "max-autotune"}, compiled=True, reserve_s=400.0),
)
# Levers on by default today (measured on a GPU as part of the farm's path): the matrix turns
# them off, and `gain` is still with / without.
INVERTED = frozenset({"channels_last", "cudnn_benchmark"})


def choose_levers(text: str) -> tuple[Lever, ...]:
    """`all`, `none`, or names from LEVERS, comma-separated."""
    if text == "all":
        return LEVERS
    if text == "none":
        return ()
    by_name = {lever.name: lever for lever in LEVERS}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"levers must be all, none or of {', '.join(by_name)}; got {unknown}")
    return tuple(by_name[n] for n in names)


def run_lever_matrix(
    model: LoadedModel,
    levers: tuple[Lever, ...],
    *,
    rows: int,
    size: int,
    steps: tuple[int, int],
    target_steps: int,
    image_tflop: float,
    peak_tflops: float,
    compile_backend: str,
    over_budget: Callable[[float], bool],
    report: Callable[[dict[str, Any]], None] = lambda matrix: None,
) -> dict[str, Any]:
    """Each lever off and on; the model is left with the baseline levers, uncompiled. `report`
    gets the matrix so far after each lever, so a run cut short keeps what it measured."""
    out: dict[str, Any] = {"rows": rows, "size": f"{size}x{size}", "levers": [], "skipped": []}
    batch = [Row(f"a lighthouse {i}", "blurry", seed=i, guidance=7.5) for i in range(rows)]

    def images_per_s(levers_used: Levers) -> float:
        _reset(model)
        apply_levers(model, levers_used)
        params = PassParams(steps[0], size, size)
        timed = measure(
            model.device,
            lambda n: render_pass(model, batch, dataclasses.replace(params, steps=n)),
            steps,
        )
        result: dict[str, Any] = {"rows": rows, **timed}
        summarise(result, image_tflop, peak_tflops, target_steps)
        return float(result[f"images_per_s_{target_steps}"])

    base = Levers(compile_backend=compile_backend, warm_up_rows=rows)
    for lever in levers:
        if lever.cuda_only and model.device.type != "cuda":
            out["skipped"].append({"lever": lever.name, "why": "CUDA only"})
            continue
        reserve = lever.reserve_s if model.device.type == "cuda" else 0.0
        if over_budget(reserve):
            out["skipped"].append({"lever": lever.name, "why": "time budget"})
            continue
        started = time.monotonic()
        off = dataclasses.replace(base, compile_unet=lever.compiled)
        on = dataclasses.replace(off, **lever.on)
        if lever.name in INVERTED:
            off, on = on, off
        off_ips, on_ips = images_per_s(off), images_per_s(on)
        gain = on_ips / off_ips
        out["levers"].append(
            {
                "lever": lever.name,
                "on": lever.on if lever.name not in INVERTED else "today's default",
                "compiled": lever.compiled or bool(lever.on.get("compile_unet")),
                f"images_per_s_off_{target_steps}": off_ips,
                f"images_per_s_on_{target_steps}": on_ips,
                "gain": gain,
                "keep": gain > KEEP_ABOVE,
                "seconds": time.monotonic() - started,
            }
        )
        print(f"lever {lever.name}: {off_ips:.3f} -> {on_ips:.3f} img/s ({gain:.2f}x)", flush=True)
        report(out)
    _reset(model)
    apply_levers(model, base)
    return out


def _reset(model: LoadedModel) -> None:
    """No compiled graphs left on the model's modules, nor in dynamo's caches."""
    for module in (model.unet, model.vae.decoder):
        module._compiled_call_impl = None
    torch.compiler.reset()


def print_levers(matrix: dict[str, Any], target_steps: int) -> None:
    print(f"\nlevers at {matrix['rows']} rows, {matrix['size']} (img/s@{target_steps}):")
    print(f"{'lever':18} {'off':>8} {'on':>8} {'gain':>6} keep")
    for row in matrix["levers"]:
        off = row[f"images_per_s_off_{target_steps}"]
        on = row[f"images_per_s_on_{target_steps}"]
        print(f"{row['lever']:18} {off:>8.3f} {on:>8.3f} {row['gain']:>5.2f}x {row['keep']}")
    for skipped in matrix["skipped"]:
        print(f"lever skipped: {skipped['lever']} ({skipped['why']})")
