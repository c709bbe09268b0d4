"""One worker process per GPU (or per CPU slot), supervised: `sdfarm worker --gpus|--processes`.

The supervisor imports no torch. It finds the GPUs with `nvidia-smi -L` (without it, it asks torch
in a child process), starts one `sdfarm worker` per GPU with `CUDA_VISIBLE_DEVICES` set to that
GPU alone, restarts a child that dies with exponential backoff, and on SIGTERM or SIGINT drains:
each child gets one SIGTERM (Celery's soft shutdown: the chunk in hand finishes or is handed back
to the ledger, nothing new is taken), and is killed only if it has not exited after
`drain_timeout_s`. Children die with the supervisor (PR_SET_PDEATHSIG), so a killed supervisor
never leaves a second set of workers behind to fight the next one for GPU memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from shared.errors import WorkerSetupError
from worker.gpus import detect_gpus

__all__ = ["ChildSpec", "Supervisor", "child_worker_args", "plan_children"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_SUPERVISOR_OPTIONS = ("--gpus", "--processes", "--device")  # the supervisor sets these itself


@dataclass(frozen=True)
class ChildSpec:
    """One worker process to keep running: its name, command line and environment overrides."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Slot:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0  # crashes in a row; reset by a run longer than `stable_s`
    restart_at: float | None = None


def child_worker_args(argv: Sequence[str]) -> list[str]:
    """The worker options a child inherits: all but --gpus, --processes and --device."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _SUPERVISOR_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in _SUPERVISOR_OPTIONS)):
            out.append(arg)
    return out


def plan_children(
    *,
    gpus: str | None,
    processes: int | None,
    device: str | None,
    worker_args: Sequence[str],
    env: Mapping[str, str],
) -> list[ChildSpec]:
    """One child per GPU asked for (`all` or `0,1,...`), or `processes` CPU children."""
    base = [sys.executable, "-m", "producer", "worker", *worker_args]
    if gpus is not None:
        if processes is not None:
            raise WorkerSetupError("give --gpus (one process per GPU) or --processes, not both")
        if device not in (None, "cuda"):
            raise WorkerSetupError(
                f"--gpus runs CUDA workers, one per GPU; leave out --device {device}, "
                "or run CPU workers with --device cpu --processes N"
            )
        chosen = _choose_gpus(gpus, env)
        return [
            ChildSpec(f"gpu{gpu}", [*base, "--device", "cuda"], {"CUDA_VISIBLE_DEVICES": gpu})
            for gpu in chosen
        ]
    count = 1 if processes is None else processes
    if count < 1:
        raise WorkerSetupError(f"--processes must be at least 1, got {count}")
    if device not in (None, "cpu"):
        raise WorkerSetupError(
            f"--processes is for CPU workers (--device cpu), got --device {device}; "
            "use --gpus all or --gpus 0,1,... for one process per GPU"
        )
    # N processes that each start a thread per core would fight over the cores; share them out.
    threads = str(max(1, (os.cpu_count() or 1) // count))
    extra = {} if "OMP_NUM_THREADS" in env else {"OMP_NUM_THREADS": threads}
    return [ChildSpec(f"cpu{i}", [*base, "--device", "cpu"], extra) for i in range(count)]


def _choose_gpus(requested: str, env: Mapping[str, str]) -> list[str]:
    available, how = detect_gpus(env)
    if not available:
        raise WorkerSetupError(
            f"--gpus needs NVIDIA GPUs and this machine shows none ({how}); "
            "run CPU workers with --device cpu --processes N"
        )
    if requested.strip() == "all":
        return available
    chosen = [g.strip() for g in requested.split(",") if g.strip()]
    if not chosen:
        raise WorkerSetupError(f"--gpus must be `all` or ids like 0,1; got {requested!r}")
    for gpu in chosen:
        if gpu not in available and not gpu.startswith(("GPU-", "MIG-")):
            raise WorkerSetupError(
                f"--gpus {requested}: there is no GPU {gpu} here; "
                f"available: {', '.join(available)} (or --gpus all)"
            )
        if chosen.count(gpu) > 1:
            raise WorkerSetupError(f"--gpus {requested}: GPU {gpu} is listed twice")
    return chosen


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Keeps one process per ChildSpec running until told to stop, then drains them all."""

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        stable_s: float = 60.0,
        drain_timeout_s: float = 90.0,
        poll_s: float = 0.2,
        keepalive: Callable[[], None] | None = None,
        keepalive_every_s: float = 10.0,
    ) -> None:
        self.slots = [_Slot(spec) for spec in children]
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        # Celery's soft shutdown gives a chunk 60 s (shared.celery_app); leave it room to end.
        self.drain_timeout_s = drain_timeout_s
        self.poll_s = poll_s
        self.keepalive = keepalive  # called every keepalive_every_s while running (GPU claims)
        self.keepalive_every_s = keepalive_every_s
        self.stopping = threading.Event()

    def run(self) -> int:
        """Start every child, restart those that die, drain on SIGTERM/SIGINT. Returns 0."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for slot in self.slots:
                self._start(slot)
            kept_at = time.monotonic()
            while not self.stopping.wait(self.poll_s):
                now = time.monotonic()
                self._check(now)
                if self.keepalive is not None and now - kept_at >= self.keepalive_every_s:
                    kept_at = now
                    self.keepalive()
            return self._drain()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def pids(self) -> list[int]:
        return [s.process.pid for s in self.slots if s.process is not None]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info(
            "supervisor: %s received; draining %d workers",
            signal.Signals(signum).name,
            len(self.slots),
        )
        self.stopping.set()

    def _start(self, slot: _Slot) -> None:
        env = {**os.environ, **slot.spec.env}
        slot.process = subprocess.Popen(
            slot.spec.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            # Own session: a terminal's Ctrl-C reaches the supervisor only, which then signals
            # each child once (a second SIGINT would turn Celery's soft shutdown into a cold one).
            start_new_session=True,
            # preexec_fn is unsafe with threads; the supervisor forks from its only thread.
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        slot.started_at = time.monotonic()
        slot.restart_at = None
        log.info(
            "supervisor: started %s (pid %d) %s",
            slot.spec.name,
            slot.process.pid,
            " ".join(f"{k}={v}" for k, v in slot.spec.env.items()),
        )

    def _check(self, now: float) -> None:
        for slot in self.slots:
            if slot.process is not None and (code := slot.process.poll()) is not None:
                ran_s = now - slot.started_at
                slot.failures = 1 if ran_s >= self.stable_s else slot.failures + 1
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (slot.failures - 1))
                log.warning(
                    "supervisor: %s (pid %d) exited with status %s after %.1f s; "
                    "restarting in %.1f s",
                    slot.spec.name,
                    slot.process.pid,
                    code,
                    ran_s,
                    delay,
                )
                slot.process = None
                slot.restart_at = now + delay
            if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)

    def _drain(self) -> int:
        running = [s for s in self.slots if s.process is not None and s.process.poll() is None]
        for slot in running:
            assert slot.process is not None
            _signal_group(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout_s
        for slot in running:
            assert slot.process is not None
            try:
                slot.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "supervisor: %s did not drain in %.0f s; killing it",
                    slot.spec.name,
                    self.drain_timeout_s,
                )
                _signal_group(slot.process.pid, signal.SIGKILL)
                slot.process.wait()
            log.info(
                "supervisor: %s exited with status %s", slot.spec.name, slot.process.returncode
            )
        return 0


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)  # start_new_session made the child its group's leader
