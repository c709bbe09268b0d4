"""The tiny model fixtures: written once per test session, shared by every test that renders.

Registered for every test module by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worker.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x-architecture model folder (epsilon prediction, seed 0)."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL base folder (`make-tiny --arch sdxl`)."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-sdxl", arch="sdxl")


@pytest.fixture(scope="session")
def tiny_refiner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL refiner folder (`make-tiny --arch sdxl-refiner`)."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-refiner", arch="sdxl-refiner")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run torch on one CPU thread for the module's tests, then restore the count.

    The tiny model's ops are too small to gain from a second thread, and on a busy machine
    (tests, workers and builds sharing 2 cores) torch's OpenMP threads wait on each other: a
    pass of 8 rows took 5-8 s on 2 threads and 0.5 s on 1 (measured under load).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
