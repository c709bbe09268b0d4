"""Finding this machine's GPUs without importing torch: `nvidia-smi -L`, else torch in a child.

Ids are nvidia-smi indexes; GPU and MIG UUIDs are accepted where a user names them, and
`claim:N` (see `worker.gpu_claims`) works by UUID, which is unique across machines.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Mapping

from shared.errors import WorkerSetupError

__all__ = ["claim_count", "detect_gpus", "gpu_uuids"]

_GPU_LINE = re.compile(r"^GPU (\d+):.*?\(UUID: (GPU-[^)]+)\)")
_MIG_LINE = re.compile(r"^\s+MIG .*?\(UUID: (MIG-[^)]+)\)")


def detect_gpus(env: Mapping[str, str]) -> tuple[list[str], str]:
    """The GPU ids this machine offers (narrowed by CUDA_VISIBLE_DEVICES), and how they were found.

    Ids are nvidia-smi indexes; GPU and MIG UUIDs are accepted too when asked for by name.
    """
    visible = env.get("CUDA_VISIBLE_DEVICES")
    wanted = None if visible is None else [d.strip() for d in visible.split(",") if d.strip()]
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is not None:
        try:
            out = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=30, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            return [], f"nvidia-smi -L failed ({e})"
        gpus, migs = _parse_nvidia_smi(out)
        indexes, uuids = [index for index, _ in gpus], {uuid for _, uuid in gpus} | migs
        if wanted is None:
            return indexes, f"nvidia-smi lists {len(indexes)}"
        return [d for d in wanted if d in indexes or d in uuids], "CUDA_VISIBLE_DEVICES"
    count = _torch_cuda_count(env)
    if wanted is not None:  # torch counts the visible ones; their names are the variable's
        return wanted[:count], "CUDA_VISIBLE_DEVICES"
    return [str(i) for i in range(count)], f"no nvidia-smi; torch sees {count}"


def _parse_nvidia_smi(text: str) -> tuple[list[tuple[str, str]], set[str]]:
    """(index, UUID) of each GPU, and the UUIDs of MIG instances."""
    gpus, migs = [], set()
    for line in text.splitlines():
        if gpu := _GPU_LINE.match(line):
            gpus.append((gpu.group(1), gpu.group(2)))
        elif mig := _MIG_LINE.match(line):
            migs.add(mig.group(1))
    return gpus, migs


def gpu_uuids(env: Mapping[str, str]) -> list[str]:
    """The UUIDs of this machine's GPUs (narrowed by CUDA_VISIBLE_DEVICES), for `claim:N`."""
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        raise WorkerSetupError("--gpus claim:N names GPUs by UUID and needs nvidia-smi; none here")
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise WorkerSetupError(f"--gpus claim:N: nvidia-smi -L failed ({e})") from e
    gpus, _ = _parse_nvidia_smi(out.stdout)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = {d.strip() for d in visible.split(",")}
        gpus = [(i, u) for i, u in gpus if i in wanted or u in wanted]
    if not gpus:
        raise WorkerSetupError("--gpus claim:N needs NVIDIA GPUs and nvidia-smi lists none")
    return [uuid for _, uuid in gpus]


def claim_count(gpus: str | None) -> int | None:
    """N for `--gpus claim:N` (None for any other form)."""
    if gpus is None or not gpus.startswith("claim:"):
        return None
    text = gpus.removeprefix("claim:")
    if not text.isdigit() or int(text) < 1:
        raise WorkerSetupError(f"--gpus claim:N needs a whole number N of at least 1; got {gpus!r}")
    return int(text)


def _torch_cuda_count(env: Mapping[str, str]) -> int:
    """Ask torch in a child process, so that the supervisor itself never imports it."""
    probe = "import torch; print(torch.cuda.device_count())"
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(env),
            check=True,
        )
        return int(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0
