"""The one `sdfarm` command: the worker's commands arrive through an entry-point group, so the
producer never imports the worker, and an install without the worker extra says what to add."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_line_loads_without_importing_the_worker_or_torch() -> None:
    # When the CLI is imported and its whole parser built (help lines not loaded)
    done = _python(
        "import sys; import producer.cli as cli; cli._parser(); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('worker')))"
    )
    # Then neither the worker package nor torch was imported
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_worker_command_without_torch_says_which_extra_to_install() -> None:
    # Given an install where torch cannot be imported (the client-only install)
    done = _python(
        "import sys; sys.modules['torch'] = None; "
        "from producer.cli import main; sys.exit(main(['worker', '--device', 'cpu']))"
    )
    # When `sdfarm worker` is asked for, Then it exits 2 naming the extra to install
    assert done.returncode == 2, done.stderr
    assert "pip install 'sdfarm[worker]'" in done.stderr
    assert "torch" in done.stderr
