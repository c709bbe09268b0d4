"""Passes sized to memory, and the levers' settings (the CUDA levers themselves need a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from shared.config import Settings
from worker.levers import Levers
from worker.models import LoadedModel, load_model
from worker.passes import render_in_passes, rows_per_pass
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
