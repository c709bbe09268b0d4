"""`make bench` keeps working: the whole bench, sized down, on this machine's CPU.

The figures of so small a run mean nothing (2 steps at 64x64 is all fixed costs); what is checked
is that every part ran and reported, and what the bench's bookkeeping must get right.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_cpu_bench_runs_every_part_and_writes_its_json(tmp_path: Path) -> None:
    # Given the bench sized down: 8 jobs in chunks of 4, two rounds, a 500-job accept
    out = tmp_path / "cpu.json"
    argv = [sys.executable, "-m", "bench.run", "--jobs", "8", "--size", "64", "--steps", "2"]
    argv += ["--max-batch", "4", "--repeats", "2", "--accept-jobs", "500", "--pollers", "2"]
    argv += ["--polls", "10", "--memory-jobs", "200", "--out", str(out)]

    # When it runs
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)

    # Then it exits cleanly, prints the table and writes every figure
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "farm / diffusers batched by hand" in done.stdout
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 2
    assert len(result["round_ratios_vs_batched"]) == 2
    # the farm rendered the 8 jobs as two full passes of 4, through the worker's own timings
    assert result["mean_rows_per_pass"] == 4.0
    assert 0 < result["model_s"] < result["worker_wall_s"] <= result["farm_s"]
    # each best figure is the best of its rounds
    assert result["batched_s"] == min(r["batched_s"] for r in result["rounds"])
    assert 0 < result["batched_save_share"] < 1  # diffusers' images were written as PNGs
    # the ratio checked against the target is the median of the rounds' own ratios
    rounds = sorted(r["batched_s"] / r["farm_s"] for r in result["rounds"])
    assert result["ratio_vs_batched"] == (rounds[0] + rounds[1]) / 2
    assert result["farm_s"] == min(r["farm_s"] for r in result["rounds"])
    assert result["redis_bytes_per_queued_job"] > 0
    assert result["worker_peak_rss_mib"] > 100  # torch and the model are loaded
    accept = result["accept"]
    assert (accept["jobs"], accept["pollers"], accept["polls"]) == (500, 2, 20)
    assert set(result["targets"]) == {
        "ratio_vs_one_by_one", "ratio_vs_batched", "accept_s", "get_batch_paced_p99_ms"
    }  # fmt: skip
    assert all(check["met"] is not None for check in result["targets"].values())
