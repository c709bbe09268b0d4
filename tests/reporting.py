"""The parity tables the rendering tests print: each test records its max pixel difference, and
the module prints them, sorted, after its last test (outside pytest's output capture)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = ["difference_report"]


def difference_report(title: str) -> Any:
    """A module-scoped `report` fixture: `report(what, difference)` records a row of the table
    headed `title`."""

    @pytest.fixture(scope="module")
    def report(request: pytest.FixtureRequest) -> Iterator[Callable[[str, int], None]]:
        seen: dict[str, int] = {}
        yield seen.__setitem__
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if capture is not None and seen:
            with capture.global_and_fixture_disabled():
                print(f"\n{title}:")
                for what, diff in sorted(seen.items()):
                    print(f"  {what}: {diff}")

    return report
