"""Passes sized to memory, and the levers' settings (the CUDA levers themselves need a GPU)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from shared.config import Settings
from worker.levers import Levers, apply_levers
from worker.models import LoadedModel, load_model
from worker.passes import render_in_passes, rows_per_pass, warm_up
from worker.sampler import PassParams, Row, render_pass

PARAMS = PassParams(steps=3, width=64, height=64)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


def test_a_chunk_too_big_for_one_pass_renders_in_several_with_the_same_images(
    tiny_model: LoadedModel,
) -> None:
    # Given five rows and a memory budget of two 64x64 rows per pass
    rows = [Row(prompt=f"a fox {i}", negative_prompt="", seed=i, guidance=7.5) for i in range(5)]
    progress: list[tuple[int, int]] = []

    # When they are rendered within that budget, and in one pass
    split = render_in_passes(
        tiny_model,
        rows,
        PARAMS,
        on_step=lambda done, total: progress.append((done, total)),
        max_pass_pixels=2 * 64 * 64,
    )
    whole = render_pass(tiny_model, rows, PARAMS)

    # Then they took three passes, and progress counted across all of them
    assert progress[-1] == (9, 9)
    assert [done for done, _ in progress] == list(range(1, 10))
    # And each image is its own seed's, whatever pass it was in (within float noise)
    assert len(split.images) == 5
    for a, b in zip(split.images, whole.images, strict=True):
        assert a is not None and b is not None
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_rows_per_pass_follows_the_pixel_budget_and_never_drops_below_one(
    tiny_model: LoadedModel,
) -> None:
    budget = 3 * 128 * 128
    assert rows_per_pass(tiny_model, PassParams(2, 128, 128), budget) == 3
    assert rows_per_pass(tiny_model, PassParams(2, 64, 64), budget) == 12
    assert rows_per_pass(tiny_model, PassParams(2, 512, 512), budget) == 1
    # And with no budget on a CPU, nothing splits
    assert rows_per_pass(tiny_model, PassParams(2, 512, 512), None) >= 256


def test_levers_come_from_settings() -> None:
    settings = Settings(compile_unet=True, compile_sizes="512x512,768x512", max_batch=12)
    levers = Levers.from_settings(settings)
    assert levers.compile_unet
    assert levers.compile_sizes == ((512, 512), (768, 512))
    assert levers.warm_up_rows == 12
    assert not levers.tf32


def test_a_malformed_compile_size_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValidationError, match="compile_sizes"):
        Settings(compile_sizes="512 by 512")


def _compiled_tiny(model_dir: Path, **levers: object) -> tuple[LoadedModel, Levers]:
    """A fresh tiny model with its U-Net compiled by the `eager` backend (traces, in seconds)."""
    model = load_model("tiny", str(model_dir))
    chosen = Levers(
        compile_unet=True, compile_backend="eager", compile_sizes=((64, 64),), warm_up_rows=1,
        **levers,  # type: ignore[arg-type]
    )  # fmt: skip
    apply_levers(model, chosen)
    return model, chosen


def _graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def test_a_restarted_worker_finds_its_warm_up_in_the_compile_cache_and_says_so(
    tiny_model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a compile cache folder on a volume, and a worker that warms up into it (cold).
    # (Eager here: what the folder keeps of Inductor's graphs needs a GPU's compile to show.)
    cache = tmp_path / "compile-cache"
    levers = Levers(compile_sizes=((64, 64),), warm_up_rows=1, compile_cache_dir=cache)
    with caplog.at_level(logging.INFO, logger="worker.passes"):
        warm_up(tiny_model, levers)
    assert "compile cache cold at 64x64: compiling, about" in caplog.text
    assert (cache / "compile-cache.json").is_file()

    # When the worker restarts on the same machine, with the same folder
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="worker.passes"):
        warm_up(tiny_model, levers)

    # Then its warm-up says it was warm, and how long it took
    assert "cold" not in caplog.text
    assert re.search(r"compile warm-up at 64x64 took [\d.]+ s \(compile cache warm\)", caplog.text)

    # While another size, or no folder, is cold again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="worker.passes"):
        warm_up(tiny_model, Levers(compile_sizes=((64, 64),), warm_up_rows=1))
    assert "compile cache not kept: no compile_cache_dir" in caplog.text


def test_a_size_that_was_not_warmed_up_runs_eager_instead_of_compiling(
    tiny_model_dir: Path,
) -> None:
    # Given a compiled worker warmed up at 64x64, with compiled graphs for warmed sizes only
    torch._dynamo.reset()
    model, levers = _compiled_tiny(tiny_model_dir, compile_only_warm_sizes=True)
    warm_up(model, levers)
    graphs = _graphs_compiled()
    assert graphs > 0

    # When a job of another size comes (128x64), and one of the warmed size
    odd = render_pass(model, [Row("a fox", "", seed=1, guidance=7.5)], PassParams(2, 128, 64))
    render_pass(model, [Row("a fox", "", seed=1, guidance=7.5)], PassParams(2, 64, 64))

    # Then no graph was compiled for either (the warmed size reused its own), and the odd size
    # still rendered, eager
    assert _graphs_compiled() == graphs
    assert odd.images[0] is not None and odd.images[0].shape == (64, 128, 3)
    torch._dynamo.reset()
