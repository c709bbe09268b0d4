"""The tiny model fixture: written once per test session, shared by every test that renders.

Import it into a test module with `from tests.fixtures_model import tiny_model_dir  # noqa: F401`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x-architecture model folder (epsilon prediction, seed 0)."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-sd")
