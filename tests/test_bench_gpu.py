"""bench/gpu.py keeps working where there is no GPU: `--tiny` runs its whole path on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.gpu import count_tflop
from bench.sd15 import build_sd15

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_tiny_on_a_cpu_and_writes_its_json(tmp_path: Path) -> None:
    # Given no GPU, and the script run as the lead runs it on one (a script, not a module)
    out = tmp_path / "gpu.json"

    # When it runs with --tiny (a generous budget: this machine's CPUs are shared)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--out", str(out),
         "--budget-s", "900", "--grace-s", "300"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path, check=False,
    )  # fmt: skip

    # Then it exits cleanly and prints the table
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "img/s@50" in done.stdout
    assert f"wrote {out}" in done.stdout

    # And the JSON holds diffusers' pipeline, the farm eager at each batch, and compiled once
    data = json.loads(out.read_text())
    runs = {(c["engine"], c["rows"], c["compiled"]) for c in data["configs"]}
    assert runs == {
        ("diffusers", 1, False),
        ("farm", 1, False),
        ("farm", 2, False),
        ("farm", 1, True),
    }, data["skipped"]
    assert data["skipped"] == []
    for config in data["configs"]:
        assert config["s_per_step"] > 0
        assert config["images_per_s_50"] > 0
        assert 0 <= config["peak_fraction"] < 1
    # And the FLOPs were counted, not assumed
    assert 0 < data["flops"]["unet_step_tflop"] < 0.01
    assert data["flops"]["image_tflop"] > 50 * data["flops"]["unet_step_tflop"]
    assert "extrapolated to 50 steps" in data["method"]


def test_the_full_size_model_is_sd15_by_its_parameters_and_flops() -> None:
    # Given SD 1.5 built from the configs in bench/sd15.py, on the meta device (shapes only)
    model = build_sd15(torch.device("meta"), torch.float16)

    # Then its parts have SD 1.5's parameter counts (millions, as published)
    def millions(module: torch.nn.Module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)

    assert millions(model.unet) == 859.5
    assert millions(model.vae) == 83.7
    assert millions(model.text_encoder) == 123.1
    # And an image at 512x512 and 50 steps costs the 83 TFLOP (1.6 a guided step)
    flops = count_tflop(model, 512)
    assert round(flops["unet_step_tflop"], 1) == 1.6
    assert round(flops["image_tflop"]) == 83
