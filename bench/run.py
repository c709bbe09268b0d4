"""`make bench`: the farm against diffusers on this CPU, side by side in one run.

    python -m bench.run [--jobs 64] [--size 128] [--steps 10] [--max-batch 8] [--out PATH]

1. direct: diffusers' StableDiffusionPipeline renders the jobs one by one, then `max_batch` a call
2. farm: the same jobs through the whole farm (API, Redis, one worker process, SeaweedFS);
   the worker's overhead (its wall time outside the U-Net, VAE and text encoder, from the
   jobs' own timings), its peak RSS, and Redis bytes per queued job
3. accept: 100,000 jobs through the API, then batch-status latency with 20 pollers
   (bench/accept.py, in its own processes)

Writes bench/results/cpu-DATE.json and prints a table with the issue's targets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.direct import Job, render_direct
from bench.farm import measure_farm
from worker.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]

# The targets: (result key, comparison, bound, label).
TARGETS = [
    ("ratio_vs_one_by_one", ">=", 1.3, "farm / diffusers one by one"),
    ("ratio_vs_batched", ">=", 0.9, "farm / diffusers batched by hand"),
    ("accept_s", "<", 5.0, "accept 100,000 jobs (s)"),
    ("get_batch_paced_p99_ms", "<", 10.0, "GET /v1/batches/{id} p99, paced pollers (ms)"),
]


def make_jobs(count: int, size: int, steps: int, *, first_seed: int = 1000) -> list[Job]:
    return [
        Job(
            prompt=f"a watercolor of lighthouse number {i}, stormy sea",
            negative_prompt="blurry, low quality",
            seed=first_seed + i,
            width=size,
            height=size,
            steps=steps,
            guidance=7.5,
        )
        for i in range(count)
    ]


def measure_accept(jobs: int, pollers: int) -> dict[str, Any]:
    """bench/accept.py in its own processes (its own Redis and API); its last line is JSON."""
    argv = [sys.executable, "-m", "bench.accept", "--jobs", str(jobs), "--pollers", str(pollers)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"accept_error": f"bench.accept exited {done.returncode}: {done.stderr[-500:]}"}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=64)
    p.add_argument("--size", type=int, default=128, help="width and height in pixels")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--accept-jobs", type=int, default=100_000)
    p.add_argument("--pollers", type=int, default=20)
    p.add_argument("--memory-jobs", type=int, default=10_000, help="queued to weigh Redis")
    p.add_argument("--repeats", type=int, default=2, help="best of: this machine is shared")
    p.add_argument("--skip-accept", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    jobs = make_jobs(args.jobs, args.size, args.steps)
    result: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "jobs": args.jobs,
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "max_batch": args.max_batch,
        "repeats": args.repeats,  # every throughput figure is the best of this many runs
    }
    with tempfile.TemporaryDirectory(prefix="sdfarm-bench-") as tmp:
        model_dir = make_tiny(Path(tmp) / "tiny")
        print(f"direct: diffusers on {args.jobs} jobs, one by one and {args.max_batch} a call")
        result |= render_direct(model_dir, jobs, args.max_batch, args.repeats)
        print("farm: API, Redis, SeaweedFS and one worker process")
        result |= measure_farm(
            Path(tmp) / "farm",
            model_dir,
            jobs,
            make_jobs(args.max_batch, args.size, args.steps, first_seed=1),
            make_jobs(args.memory_jobs, args.size, args.steps, first_seed=10**6),
            args.max_batch,
            args.repeats,
        )
    result["ratio_vs_one_by_one"] = result["farm_images_per_s"] / result["one_by_one_images_per_s"]
    result["ratio_vs_batched"] = result["farm_images_per_s"] / result["batched_images_per_s"]
    if not args.skip_accept:
        print(f"accept: {args.accept_jobs} jobs through the API, {args.pollers} pollers")
        accept = measure_accept(args.accept_jobs, args.pollers)
        result["accept"] = accept
        keys = ["accept_s", "get_batch_p50_ms", "get_batch_p99_ms", "accept_error"]
        keys += ["get_batch_paced_p50_ms", "get_batch_paced_p99_ms"]
        for key in keys:
            if key in accept:
                result[key] = accept[key]
        if "accept_s" in accept:
            result["accept_jobs_per_s"] = accept["jobs"] / accept["accept_s"]
    result["total_s"] = time.monotonic() - started
    result["targets"] = _check_targets(result)
    out = args.out or ROOT / "bench" / "results" / f"cpu-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result)
    print(f"wrote {out}")
    return 0


def _check_targets(result: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for key, op, bound, _ in TARGETS:
        value = result.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value < bound)
        checks[key] = {"value": value, "target": f"{op} {bound}", "met": met}
    return checks


def _print_table(r: dict[str, Any]) -> None:
    rows = [
        ("diffusers one by one", r["one_by_one_images_per_s"], "img/s"),
        (f"diffusers batched by hand, {r['max_batch']} a call", r["batched_images_per_s"], "img/s"),
        (f"farm: API + Redis + 1 worker + S3 ({r['jobs']} jobs)", r["farm_images_per_s"], "img/s"),
        ("farm / diffusers one by one", r["ratio_vs_one_by_one"], "x"),
        ("farm / diffusers batched by hand", r["ratio_vs_batched"], "x"),
        ("worker time outside U-Net, VAE, text encoder", 100 * r["overhead_share"], "%"),
        ("worker peak RSS", r["worker_peak_rss_mib"], "MiB"),
        ("Redis per queued job", r["redis_bytes_per_queued_job"], "bytes"),
    ]  # fmt: skip
    if "accept_s" in r:
        rows += [
            (f"accept {r['accept']['jobs']} jobs (ledger + pending lists)", r["accept_s"], "s"),
            ("accept rate", r["accept_jobs_per_s"], "jobs/s"),
            ("batch status p50, 20 pollers back to back", r["get_batch_p50_ms"], "ms"),
            ("batch status p99, 20 pollers back to back", r["get_batch_p99_ms"], "ms"),
            ("batch status p50, 20 pollers every 100 ms", r["get_batch_paced_p50_ms"], "ms"),
            ("batch status p99, 20 pollers every 100 ms", r["get_batch_paced_p99_ms"], "ms"),
        ]  # fmt: skip
    elif "accept_error" in r:
        print(f"accept: {r['accept_error']}")
    width = max(len(label) for label, _, _ in rows)
    print(f"\nsdfarm bench on {r['host']}, {r['date']}: {r['size']}, {r['steps']} steps")
    for label, value, unit in rows:
        print(f"  {label:<{width}}  {value:>10.2f} {unit}")
    print("targets:")
    for key, check in r["targets"].items():
        label = next(t[3] for t in TARGETS if t[0] == key)
        mark = {True: "met", False: "MISSED", None: "not measured"}[check["met"]]
        print(f"  {label:<{width}}  {check['target']:>10} {mark}")


if __name__ == "__main__":
    sys.exit(main())
