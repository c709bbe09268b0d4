"""The output pipeline: PNG encoding, upload and the `succeeded` write, off the sampling path.

While the GPU samples chunk k+1, one background thread encodes, uploads and reports chunk k. The
pipeline is bounded: `submit` blocks while `depth` chunks already wait, so a slow store slows the
renders down instead of piling decoded images up in memory (at most `depth` waiting chunks plus
the one being stored, whatever the store's speed).

Nothing can be lost on a crash: a job becomes `succeeded` only inside the stored work, after its
object is in the store, so a job still waiting here when the process dies is `running` in the
ledger with a lease that lapses, and the reconciler sends it again. A stopping worker drains the
pipeline (`close`) before it exits, so an orderly stop leaves no job behind either.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["OutputPipeline", "OutputStats"]

log = logging.getLogger(__name__)

# Chunks waiting to be stored while another is being stored. One is enough to hide the I/O of a
# chunk behind the next chunk's render; more would only hold more decoded images in memory.
DEFAULT_DEPTH = 1


@dataclass
class OutputStats:
    """What the pipeline did, for logs and the benchmark."""

    chunks: int = 0  # units of work finished (failed ones included)
    failures: int = 0  # units whose work raised; their jobs wait for their leases to lapse
    busy_s: float = 0.0  # time spent doing the work
    blocked_s: float = 0.0  # time `submit` waited for room: the sampler waiting on I/O


@dataclass(frozen=True)
class _Work:
    label: str  # the chunk's first job id, for log lines
    run: Callable[[], None]


class OutputPipeline:
    """One background thread that runs submitted store work in order, `depth` units ahead."""

    def __init__(self, depth: int = DEFAULT_DEPTH, *, name: str = "output") -> None:
        if depth < 1:
            raise ValueError(f"`depth` must be at least 1, got {depth}")
        self.depth = depth
        self.stats = OutputStats()
        self._queue: queue.Queue[_Work | None] = queue.Queue(maxsize=depth)
        self._closed = False
        self._lock = threading.Lock()  # guards `_closed` against a submit racing a close
        # Not a daemon: an interpreter exit must not cut a store in half; `close` ends it.
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.start()

    def submit(self, label: str, run: Callable[[], None]) -> None:
        """Queue `run` (the store work of one chunk); blocks while the pipeline is full.

        `label` names the work in log lines (the chunk's first job id).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"output pipeline is closed; cannot store chunk {label}")
        started = time.perf_counter()
        self._queue.put(_Work(label, run))
        self.stats.blocked_s += time.perf_counter() - started

    def drain(self) -> None:
        """Wait until every submitted unit of work has run."""
        self._queue.join()

    def close(self) -> None:
        """Run what was submitted, then stop the thread. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join()
        log.info(
            "output pipeline stopped after %d chunks (%d failed, %.1f s storing, %.1f s blocked)",
            self.stats.chunks,
            self.stats.failures,
            self.stats.busy_s,
            self.stats.blocked_s,
        )

    def __enter__(self) -> OutputPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            try:
                if work is None:
                    return
                self._do(work)
            finally:
                self._queue.task_done()

    def _do(self, work: _Work) -> None:
        started = time.perf_counter()
        try:
            work.run()
        except Exception:
            # The thread must outlive one bad chunk. Its jobs stay `running` and are not lost:
            # their leases lapse and the reconciler sends them again (the module docstring).
            self.stats.failures += 1
            log.exception("chunk %s: storing its images failed; its leases will lapse", work.label)
        finally:
            self.stats.chunks += 1
            self.stats.busy_s += time.perf_counter() - started
