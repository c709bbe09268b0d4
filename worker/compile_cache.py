"""Warm starts: compiled graphs kept in `compile_cache_dir`, a volume that outlives the worker.

Inside the folder: `inductor/` (Inductor's own caches: FX graphs, Triton kernels, autotuning,
pointed at by TORCHINDUCTOR_CACHE_DIR), `artifacts.bin` (torch.compiler.save_cache_artifacts():
the same caches as one portable file, loaded back with load_cache_artifacts() at start, so a
fresh `inductor/` fills from it) and `compile-cache.json`, which records, per model, size,
backend, mode and torch version, how long the warm-up took. A worker whose entry is there starts
warm (its graphs come from the caches: seconds, not minutes); one without says it is cold and
about how long compiling will take (from what an H200 measured, GRAPH_S).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CompileCache", "cache_key", "cold_estimate_s"]

log = logging.getLogger(__name__)

MANIFEST = "compile-cache.json"
ARTIFACTS = "artifacts.bin"
# One U-Net graph of SD 1.5 on an H200 (bench/results/gpu-h200-2026-11-28.json: a static graph
# 56 s, a dynamic-batch one 67 s); SDXL's has 4x the transformer blocks (an estimate).
GRAPH_S = {"sd1": 60.0, "sd2": 60.0, "sdxl": 150.0}
GRAPHS_PER_SIZE = 3  # the largest pass (static), one row (dynamic batch), small batches


def cold_estimate_s(family: str, sizes: int) -> float:
    return GRAPH_S.get(family, 60.0) * GRAPHS_PER_SIZE * sizes


@dataclass
class CompileCache:
    """The cache folder of one worker process (or none: `folder` None)."""

    folder: Path | None
    loaded_artifacts: bool = False

    @classmethod
    def open(cls, folder: Path | None) -> CompileCache:
        """Point Inductor's caches into `folder` and load its artifacts; before any compile."""
        if folder is None:
            return cls(None)
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
        torch._inductor.config.fx_graph_cache = True
        artifacts = folder / ARTIFACTS
        loaded = False
        if artifacts.is_file():
            try:
                loaded = torch.compiler.load_cache_artifacts(artifacts.read_bytes()) is not None
            # A file from another torch or a torn copy: whatever it raises, start cold instead.
            except Exception as e:
                log.warning("compile cache %s: artifacts not loaded (%s)", artifacts, e)
        return cls(folder, loaded)

    def warm_s(self, key: str) -> float | None:
        """The warm-up time recorded for `key`, if this folder has compiled it before."""
        entry = self._manifest().get(key)
        return None if entry is None else float(entry["warm_up_s"])

    def record(self, key: str, warm_up_s: float, *, warm: bool) -> None:
        """After a warm-up: remember it, and write the caches as one artifacts file."""
        if self.folder is None:
            return
        manifest = self._manifest()
        entry = manifest.get(key, {})
        if not warm:
            entry["warm_up_s"] = warm_up_s  # the cold time: what a next cold start will take
        entry["last_warm_up_s"] = warm_up_s
        entry["at"] = time.time()
        manifest[key] = entry
        _write(self.folder / MANIFEST, json.dumps(manifest, indent=2).encode())
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            _write(self.folder / ARTIFACTS, saved[0])

    def _manifest(self) -> dict[str, Any]:
        if self.folder is None:
            return {}
        path = self.folder / MANIFEST
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data


def cache_key(
    model_hash: str, *, device: str, size: tuple[int, int], rows: int, backend: str, mode: str
) -> str:
    """What a warm-up compiled: the model, on which card, the size, the largest pass, how, and
    with which torch."""
    width, height = size
    return (
        f"{model_hash}:{device}:{width}x{height}:{rows}:{backend}:{mode}:torch-{torch.__version__}"
    )


def _write(path: Path, data: bytes) -> None:
    """Atomically: a worker killed mid-write leaves the last complete file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
