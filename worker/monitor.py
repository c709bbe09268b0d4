"""While a chunk renders: a background thread does its Redis work, so the sampling loop never waits.

Every `interval_s` it renews the chunk's leases (for the ledger's `lease_s`, by Redis's clock),
writes the latest step and reads cancel requests; the per-step callback only reads and writes
memory. The leases are renewed from the moment the jobs are claimed until the chunk is handed to
storage, so reading init images or a slow first pass never lets a lease lapse.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from shared.errors import RenderCancelled
from shared.ledger import Ledger

__all__ = ["ChunkMonitor"]

log = logging.getLogger(__name__)


class ChunkMonitor:
    """Renews a chunk's leases, reports its progress and collects its cancel requests."""

    def __init__(
        self, ledger: Ledger, worker_id: str, job_ids: Sequence[str], *, interval_s: float
    ) -> None:
        self.ledger = ledger
        self.worker_id = worker_id
        self.job_ids = list(job_ids)
        self.interval_s = interval_s
        self.cancelled: set[str] = set()
        self.progress: tuple[int, int] | None = None
        self.in_pass: list[str] = self.job_ids  # the rows of the pass rendering now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chunk-monitor", daemon=True)

    def __enter__(self) -> ChunkMonitor:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def on_step(self, step: int, steps: int) -> None:
        """Called after every sampling step; raises once every job of the pass is cancelled."""
        self.progress = (step, steps)
        if self.cancelled and self.cancelled.issuperset(self.in_pass):
            raise RenderCancelled(f"all {len(self.in_pass)} jobs of the pass were cancelled")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()

    def _beat(self) -> None:
        try:
            self.cancelled |= self.ledger.renew_leases(self.worker_id, self.job_ids, self.progress)
        except Exception as e:  # a Redis blip must not kill the render; the lease may lapse
            log.warning("heartbeat for chunk %s failed: %s", self.job_ids[0], e)
