"""`make bench`: the farm against diffusers on this CPU, side by side in one run.

    python -m bench.run [--jobs 64] [--size 128] [--steps 10] [--max-batch 8] [--out PATH]

1. direct: diffusers' StableDiffusionPipeline renders the jobs one by one, then `max_batch` a call
2. farm: the same jobs through the whole farm (API, Redis, one worker process, SeaweedFS);
   the worker's overhead (its wall time outside the U-Net, VAE and text encoder, from the
   jobs' own timings), its peak RSS, and Redis bytes per queued job
   1 and 2 take turns for `--repeats` rounds (the farm stays up, idle, while diffusers runs), so
   that a machine whose speed drifts during the bench skews neither side: the ratio to
   hand-batched diffusers is the median of the rounds' own ratios; each throughput is the best
   of its rounds (one by one runs in the first round only: it is far behind either)
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.direct import DirectPipeline, Job
from bench.farm import BenchFarm
from worker.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]

# The targets: (result key, comparison, bound, label).
TARGETS = [
    ("ratio_vs_one_by_one", ">=", 1.3, "farm / diffusers one by one"),
    ("ratio_vs_batched", ">=", 0.9, "farm / diffusers batched by hand (median)"),
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


def measure_accept(jobs: int, pollers: int, polls: int) -> dict[str, Any]:
    """bench/accept.py in its own processes (its own Redis and API); its last line is JSON."""
    argv = [sys.executable, "-m", "bench.accept", "--jobs", str(jobs), "--pollers", str(pollers)]
    argv += ["--polls", str(polls)]
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
    p.add_argument("--polls", type=int, default=100, help="requests per poller")
    p.add_argument("--memory-jobs", type=int, default=10_000, help="queued to weigh Redis")
    p.add_argument("--repeats", type=int, default=7, help="rounds of diffusers and the farm")
    p.add_argument(
        "--storage", choices=["s3", "file"], default="s3",
        help="where the farm stores images: SeaweedFS, or a folder (to see what S3 costs)",
    )  # fmt: skip
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
        "storage": args.storage,
        "repeats": args.repeats,  # rounds of diffusers batched and the farm, taking turns
    }
    with tempfile.TemporaryDirectory(prefix="sdfarm-bench-") as tmp:
        model_dir = make_tiny(Path(tmp) / "tiny")
        warm_up = make_jobs(args.max_batch, args.size, args.steps, first_seed=1)
        direct = DirectPipeline(model_dir, warm_up)
        print("farm: starting API, Redis, SeaweedFS and one worker process")
        with BenchFarm(Path(tmp) / "farm", model_dir, args.max_batch, args.storage) as farm:
            farm.warm_up(warm_up)
            rounds = [_round(index, args, direct, farm, jobs) for index in range(args.repeats)]
            memory_jobs = make_jobs(args.memory_jobs, args.size, args.steps, first_seed=10**6)
            result |= farm.finish(memory_jobs)
    result |= _best_of(rounds, args.jobs)
    if not args.skip_accept:
        print(f"accept: {args.accept_jobs} jobs through the API, {args.pollers} pollers")
        accept = measure_accept(args.accept_jobs, args.pollers, args.polls)
        result["accept"] = accept
        keys = ["accept_s", "get_batch_p50_ms", "get_batch_p99_ms", "get_batch_per_s"]
        keys.append("accept_error")
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


def _round(
    index: int, args: argparse.Namespace, direct: DirectPipeline, farm: BenchFarm, jobs: list[Job]
) -> dict[str, Any]:
    """One turn of each: diffusers batched by hand (and one by one, in the first), and the farm.

    Odd rounds run the farm first, so that neither side always follows the other.
    """
    out: dict[str, Any] = {}
    first = index == 0

    def run_direct() -> None:
        print(f"round {index + 1}: diffusers on {len(jobs)} jobs" + (", one by one" * first))
        cpu_before = sum(farm.cpu_seconds().values())
        spent_s = 0.0
        if first:  # far behind either other figure: one round of it is enough
            out["one_by_one_s"] = direct.one_by_one(jobs)
            spent_s += out["one_by_one_s"]
        out["batched_s"] = direct.batched(jobs, args.max_batch)
        out["batched_save_s"] = direct.save_s
        spent_s += out["batched_s"]
        # What the idle farm took from diffusers: its processes' CPU while diffusers ran.
        out["farm_idle_cpu_share"] = (sum(farm.cpu_seconds().values()) - cpu_before) / spent_s

    def run_farm() -> None:
        print(f"round {index + 1}: the farm on {len(jobs)} jobs")
        out.update(farm.run(jobs))

    for step in (run_farm, run_direct) if index % 2 else (run_direct, run_farm):
        step()
    out["ratio_vs_batched"] = out["batched_s"] / out["farm_s"]
    return out


def _best_of(rounds: list[dict[str, Any]], jobs: int) -> dict[str, Any]:
    """Each path's best round, the ratios of those, and the median of the rounds' own ratios.

    The target is checked on the median: each round's two runs are minutes apart at most, so a
    machine that speeds up or slows down during the bench moves both sides of a round's ratio.
    """
    best_farm = min(rounds, key=lambda r: r["farm_s"])
    farm_keys = ["farm_s", "farm_images_per_s", "worker_wall_s", "model_s", "overhead_share"]
    farm_keys += ["mean_rows_per_pass", "cpu_s", "pass_model_s"]
    result: dict[str, Any] = {key: best_farm[key] for key in farm_keys}
    best_batched = min(rounds, key=lambda r: r["batched_s"])
    result["batched_s"] = best_batched["batched_s"]
    result["batched_save_share"] = best_batched["batched_save_s"] / best_batched["batched_s"]
    result["one_by_one_s"] = rounds[0]["one_by_one_s"]
    for key in ("one_by_one", "batched"):
        result[f"{key}_images_per_s"] = jobs / result[f"{key}_s"]
    result["ratio_vs_one_by_one"] = result["farm_images_per_s"] / result["one_by_one_images_per_s"]
    result["best_ratio_vs_batched"] = result["farm_images_per_s"] / result["batched_images_per_s"]
    result["round_ratios_vs_batched"] = [r["ratio_vs_batched"] for r in rounds]
    result["ratio_vs_batched"] = statistics.median(result["round_ratios_vs_batched"])
    result["farm_idle_cpu_share"] = max(r["farm_idle_cpu_share"] for r in rounds)
    result["rounds"] = rounds
    return result


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
        ("farm / diffusers batched by hand, median of rounds", r["ratio_vs_batched"], "x"),
        ("  the same, best round of each", r["best_ratio_vs_batched"], "x"),
        ("  diffusers' time spent writing its PNGs", 100 * r["batched_save_share"], "%"),
        ("farm's idle CPU while diffusers ran (of a core)", 100 * r["farm_idle_cpu_share"], "%"),
        ("worker time outside U-Net, VAE, text encoder", 100 * r["overhead_share"], "%"),
        ("worker peak RSS", r["worker_peak_rss_mib"], "MiB"),
        ("Redis per queued job", r["redis_bytes_per_queued_job"], "bytes"),
    ]  # fmt: skip
    if "accept_s" in r:
        n = r["accept"]["pollers"]
        rows += [
            (f"accept {r['accept']['jobs']} jobs (ledger + pending lists)", r["accept_s"], "s"),
            ("accept rate", r["accept_jobs_per_s"], "jobs/s"),
            (f"batch status p50, {n} pollers back to back", r["get_batch_p50_ms"], "ms"),
            (f"batch status p99, {n} pollers back to back", r["get_batch_p99_ms"], "ms"),
            ("  requests answered, back to back", r["get_batch_per_s"], "req/s"),
            (f"batch status p50, {n} pollers every 100 ms", r["get_batch_paced_p50_ms"], "ms"),
            (f"batch status p99, {n} pollers every 100 ms", r["get_batch_paced_p99_ms"], "ms"),
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
