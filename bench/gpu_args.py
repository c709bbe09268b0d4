"""bench/gpu.py's command line: which models, parts and levers, and the time each may take."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.lever_matrix import Lever, choose_levers
from bench.parts import MODELS

__all__ = ["PARTS", "PART_BUDGET_S", "parser"]

PART_BUDGET_S = 210.0  # each model's share of the default --budget-s
PARTS = ("sampling", "levers", "farm_e2e")  # --parts; the last two on SD 1.5 only


def parser(doc: str | None) -> argparse.ArgumentParser:
    """bench/gpu.py's command line (its docstring is the help)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny models on the CPU, 64x64")
    p.add_argument("--model", choices=MODELS, default="both", help="which models (default both)")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/gpu-DATE.json)")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--batches",
        type=_batches,
        help="rows per pass for the farm (SD 1.5 1,4,8,16; SDXL 1,4,8; tiny 1,2)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the compiled runs")
    p.add_argument(
        "--budget-s",
        type=float,
        help=f"start nothing new after this (default {PART_BUDGET_S:.0f} s a model)",
    )
    p.add_argument("--grace-s", type=float, default=30.0, help="then this long before exiting")
    p.add_argument(
        "--compile-reserve-s",
        type=float,
        default=75.0,
        help="time an SD 1.5 U-Net compile may take",
    )
    p.add_argument(
        "--sdxl-compile-reserve-s",
        type=float,
        default=150.0,
        help="time an SDXL U-Net compile may take (4x SD 1.5's transformer blocks; an estimate)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=790.0, help="the device's dense fp16 peak (H200)"
    )
    p.add_argument("--parts", type=_parts, default=PARTS, help=f"of {','.join(PARTS)} (all)")
    p.add_argument("--levers", type=_levers, default="all", help="all, none, or names")
    p.add_argument("--lever-rows", type=int, help="rows per pass in the matrix (8; tiny 1)")
    p.add_argument("--lever-budget-s", type=float, default=420.0, help="the matrix's time")
    p.add_argument("--e2e-jobs", type=int, help="farm_e2e's jobs (96; tiny 4)")
    p.add_argument("--e2e-budget-s", type=float, default=600.0, help="farm_e2e's time (watchdog)")
    return p


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts or any(p not in PARTS for p in parts):
        raise argparse.ArgumentTypeError(f"parts are of {', '.join(PARTS)}; got {text!r}")
    return parts


def _batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"rows per pass look like 1,4,8 (each >= 1); got {text!r}")
    return batches


def _levers(text: str) -> tuple[Lever, ...]:
    try:
        return choose_levers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
