"""The `lms_precompute` lever: LMS's coefficients tabulated once, with the same images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.integrate

from worker.models import LoadedModel, load_model
from worker.sampler import PassParams, Row, render_pass
from worker.schedulers import set_host_precompute

ROWS = [
    Row(prompt=f"a lighthouse {i}", negative_prompt="dusk", seed=i, guidance=7.5) for i in (1, 2)
]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


@pytest.fixture
def lever_off_after() -> Iterator[None]:
    yield
    set_host_precompute(False)


def _count_integrations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    quad = scipy.integrate.quad

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return quad(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scipy.integrate, "quad", counted)
    return calls


@pytest.mark.parametrize("steps", [3, 8])
def test_precomputed_lms_coefficients_give_bit_identical_images(
    tiny_model: LoadedModel, steps: int, lever_off_after: None
) -> None:
    # Given the same two rows rendered with LMS integrating at every step
    params = PassParams(steps=steps, width=64, height=64, scheduler="lms")
    set_host_precompute(False)
    per_step = render_pass(tiny_model, ROWS, params)

    # When the lever tabulates the coefficients once per schedule
    set_host_precompute(True)
    tabulated = render_pass(tiny_model, ROWS, params)

    # Then every pixel of every image is the same
    for a, b in zip(per_step.images, tabulated.images, strict=True):
        assert a is not None and b is not None
        assert np.array_equal(a, b)


def test_a_warm_worker_integrates_each_schedule_only_once(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch, lever_off_after: None
) -> None:
    # Given the lever on, and a schedule (7 steps) that a first pass tabulated
    set_host_precompute(True)
    params = PassParams(steps=7, width=64, height=64)
    render_pass(tiny_model, ROWS, params)
    calls = _count_integrations(monkeypatch)

    # When the next pass of that schedule renders
    render_pass(tiny_model, ROWS, params)

    # Then it integrated nothing on the host
    assert calls[0] == 0

    # While with the lever off, each step integrates its coefficients again
    set_host_precompute(False)
    render_pass(tiny_model, ROWS, params)
    assert calls[0] >= 7
