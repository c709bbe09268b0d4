"""The GPU's busy share while the farm renders, sampled with nvidia-smi (None without it)."""

from __future__ import annotations

import shutil
import subprocess
import threading
from types import TracebackType
from typing import Self

__all__ = ["GpuBusy"]

SAMPLE_MS = 200  # nvidia-smi's own sampling period is about this; faster repeats its figure


class GpuBusy:
    """`with GpuBusy() as busy: ...`, then `busy.share()`: mean utilisation, 0-1, or None."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Self:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return self
        argv = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        argv += [f"-lms={SAMPLE_MS}", "--id=0"]
        self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, name="gpu-busy", daemon=True)
        self._reader.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
        if self._reader is not None:
            self._reader.join(10)

    def share(self) -> float | None:
        """The mean busy share over the samples, None without nvidia-smi or samples."""
        if not self.samples:
            return None
        return sum(self.samples) / len(self.samples) / 100

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:  # "[N/A]" or a header: not a sample
                continue
