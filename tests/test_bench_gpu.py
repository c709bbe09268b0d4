"""bench/gpu.py keeps working where there is no GPU: `--tiny` runs its whole path on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench.farm_e2e import E2E_FIELDS
from bench.gpu import count_tflop
from bench.lever_matrix import LEVERS
from bench.sd15 import build_sd15
from bench.sdxl import build_sdxl

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TinyRun:
    done: subprocess.CompletedProcess[str]
    out: Path


@pytest.fixture(scope="module")
def tiny_sd15_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """One run of every part (sampling, lever matrix, farm_e2e) on the tiny SD 1.5, shared by
    the tests that read it: each part starts processes and compiles, minutes on a shared CPU."""
    # Given no GPU, and the script run as the lead runs it on one (a script, not a module)
    tmp_path = tmp_path_factory.mktemp("bench-gpu")
    out = tmp_path / "gpu.json"

    # When it runs with --tiny on SD 1.5 (a generous budget: this machine's CPUs are shared)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--model", "sd15",
         "--out", str(out), "--budget-s", "900", "--grace-s", "300"],
        capture_output=True, text=True, timeout=1800, cwd=tmp_path, check=False,
    )  # fmt: skip
    return TinyRun(done, out)


def test_the_gpu_benchmark_runs_tiny_on_a_cpu_and_writes_its_json(tiny_sd15_run: TinyRun) -> None:
    done, out = tiny_sd15_run.done, tiny_sd15_run.out

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


def test_the_tiny_run_measures_the_whole_farm_end_to_end_eager_and_compiled(
    tiny_sd15_run: TinyRun,
) -> None:
    # Given the tiny run of every part (the fixture)
    done = tiny_sd15_run.done
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    e2e = json.loads(tiny_sd15_run.out.read_text())["farm_e2e"]

    # Then the farm rendered the jobs over HTTP, stored in files, on the CPU
    assert e2e["device"] == "cpu" and e2e["storage"] == "file"
    assert e2e["jobs"] >= 4 and e2e["diffusers_batched_images_per_s"] > 0
    # And each worker, eager and compiled, has the fields with real figures
    for engine in ("eager", "compiled"):
        result = e2e[engine]
        assert set(E2E_FIELDS) <= set(result), result
        assert result["images_per_s"] > 0
        expected = result["images_per_s"] / e2e["diffusers_batched_images_per_s"]
        assert abs(result["ratio_to_diffusers_batched"] - expected) < 1e-9
        assert result["gpu_busy_share"] is None  # no nvidia-smi here
        assert result["share_of_peak"] is None  # a CPU has no peak to share
        assert result["ready_s"]["cold"] > 0
    # And the compiled worker was restarted on its compile cache: ready warm as well
    assert e2e["compiled"]["ready_s"]["warm"] > 0
    # And the table printed it
    assert "farm end to end on cpu" in done.stdout


def test_the_tiny_run_measures_each_lever_on_and_off_or_says_why_not(
    tiny_sd15_run: TinyRun,
) -> None:
    # Given the tiny run of every part (the fixture)
    assert tiny_sd15_run.done.returncode == 0, tiny_sd15_run.done.stderr[-3000:]
    matrix = json.loads(tiny_sd15_run.out.read_text())["levers"]

    # Then every lever of the matrix was measured on and off, or skipped with its reason
    measured = {row["lever"] for row in matrix["levers"]}
    skipped = {row["lever"]: row["why"] for row in matrix["skipped"]}
    assert measured | set(skipped) == {lever.name for lever in LEVERS}
    assert not measured & set(skipped)
    # And those a CPU can run were measured: LMS's table and the compiled VAE
    assert {"lms_precompute", "compile_vae"} <= measured
    assert skipped["attention_auto"] == "CUDA only"
    for row in matrix["levers"]:
        assert row["images_per_s_off_50"] > 0 and row["images_per_s_on_50"] > 0
        assert row["gain"] == pytest.approx(row["images_per_s_on_50"] / row["images_per_s_off_50"])
        assert row["keep"] == (row["gain"] > 1.03)
    assert "levers at 1 rows" in tiny_sd15_run.done.stdout


def test_the_full_size_model_is_sd15_by_its_parameters_and_flops() -> None:
    # Given SD 1.5 built from the configs in bench/sd15.py, on the meta device (shapes only)
    model = build_sd15(torch.device("meta"), torch.float16)

    # Then its parts have SD 1.5's parameter counts (millions, as published)
    def millions(module: torch.nn.Module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)

    assert millions(model.unet) == 859.5
    assert millions(model.vae) == 83.7
    assert model.text_encoder is not None
    assert millions(model.text_encoder) == 123.1
    # And an image at 512x512 and 50 steps costs the 83 TFLOP (1.6 a guided step)
    flops = count_tflop(model, 512)
    assert round(flops["unet_step_tflop"], 1) == 1.6
    assert round(flops["image_tflop"]) == 83


def test_the_gpu_benchmark_runs_the_tiny_sdxl_through_the_farm_on_a_cpu(tmp_path: Path) -> None:
    # Given no GPU, and the script run as on the GPU machine, for SDXL alone
    out = tmp_path / "gpu-sdxl.json"

    # When it runs with --tiny --model sdxl (the same path as full size, at 64x64)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--model", "sdxl",
         "--out", str(out), "--budget-s", "900", "--grace-s", "300"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path, check=False,
    )  # fmt: skip

    # Then it exits cleanly and prints SDXL's table, at SDXL's 30 steps
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "tiny SDXL on cpu, 64x64" in done.stdout
    assert "img/s@30" in done.stdout

    # And the JSON holds diffusers' SDXL pipeline and the farm eager at 1 and 2 rows and compiled,
    # every one marked as SDXL's, with positive figures
    data = json.loads(out.read_text())
    runs = {(c["model"], c["engine"], c["rows"], c["compiled"]) for c in data["configs"]}
    assert runs == {
        ("sdxl", "diffusers", 1, False),
        ("sdxl", "farm", 1, False),
        ("sdxl", "farm", 2, False),
        ("sdxl", "farm", 1, True),
    }, data["skipped"]
    assert data["skipped"] == []
    for config in data["configs"]:
        assert config["target_steps"] == 30
        assert config["s_per_step"] > 0
        assert config["images_per_s_30"] > 0
        assert config["tflops"] > 0
        assert 0 < config["peak_fraction"] < 1
    assert all(c["failed_rows"] == 0 for c in data["configs"] if c["engine"] == "farm")
    # And SDXL's FLOPs were counted (its added conditioning included), an image at 30 steps
    sdxl = data["models"]["sdxl"]
    assert sdxl["size"] == "64x64"
    assert 0 < sdxl["flops"]["unet_step_tflop"] < 0.01
    assert sdxl["flops"]["image_tflop"] > 30 * sdxl["flops"]["unet_step_tflop"]
    assert "30 steps for SDXL" in data["method"]


def test_the_full_size_sdxl_is_sdxl_base_by_its_parameters() -> None:
    # Given SDXL built from the configs in bench/sdxl.py, on the meta device (shapes only)
    model = build_sdxl(torch.device("meta"), torch.float16)

    # Then it is an SDXL model of 1024x1024 whose parts have SDXL 1.0 base's parameter counts
    def millions(module: torch.nn.Module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)

    assert model.family == "sdxl"
    assert model.native_px == 1024
    assert model.text_encoder is not None and model.text_encoder_2 is not None
    assert millions(model.unet) == 2567.5
    assert millions(model.text_encoder) == 123.1
    assert millions(model.text_encoder_2) == 694.7
    assert millions(model.vae) == 83.7
    # And its VAE is kept in float32 (force_upcast), the rest in float16
    assert model.vae.dtype == torch.float32
    assert model.unet.dtype == torch.float16
    # And a guided step at 1024x1024 costs 13.5 TFLOP as counted (6.8 a sample: its attention
    # and convolutions add up to about that by hand), an image at 30 steps about 416
    flops = count_tflop(model, 1024, target_steps=30)
    assert round(flops["unet_step_tflop"], 1) == 13.5
    assert round(flops["image_tflop"]) == 416
