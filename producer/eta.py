"""Watching a batch: throughput measured from recent finishes, queue position and ETA.

Finished images are counted per model and per worker in `THROUGHPUT_BUCKET_S` buckets (the
ledger does it after every successful transition). The throughput of a model is the count of the
last `throughput_window_s` divided by the time since the first non-empty bucket of that window,
so a farm that just started is not underestimated.

Every status request needs the same few farm-wide facts (the unfinished batches, each model's
recent throughput, which models a live worker holds); they are read at most once a second and
shared, so that a status request costs one Redis read of its own, however many clients poll.

Queue position is an upper bound: the queued jobs of other unfinished batches that share a model
with this one and go first under priority order (more urgent, or as urgent and older). A fair
dispatcher serves batches of equal priority in turn, so a small batch usually starts sooner.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from shared.config import Settings
from shared.ledger import THROUGHPUT_BUCKET_S, BatchRecord, Ledger
from shared.ledger.stats import ActiveBatch

__all__ = ["ActiveBatch", "Estimate", "QueueView"]

SNAPSHOT_TTL_S = 1.0  # many pollers share one read of each farm-wide fact per second
WORKER_RATE_WINDOW_S = 60.0  # images/s per worker is over the last minute

T = TypeVar("T")


@dataclass(frozen=True)
class Estimate:
    queue_position: int | None
    eta_s: float | None
    throughput: float | None


class QueueView:
    """Reads the farm's recent throughput, its unfinished batches and the models live workers
    hold; what `estimate` and `serving_models` read is cached for `SNAPSHOT_TTL_S`."""

    def __init__(self, ledger: Ledger, settings: Settings) -> None:
        self.ledger = ledger
        self.settings = settings
        self._lock = threading.Lock()
        self._cache: dict[Hashable, tuple[float, Any]] = {}

    def _cached(self, key: Hashable, read: Callable[[], T]) -> T:
        """`read()`, or what it returned less than SNAPSHOT_TTL_S ago."""
        with self._lock:
            taken_at, value = self._cache.get(key, (float("-inf"), None))
            if time.monotonic() - taken_at < SNAPSHOT_TTL_S:
                return value  # type: ignore[no-any-return]
            value = read()
            self._cache[key] = (time.monotonic(), value)
            return value

    def throughput(
        self, kind: str, names: Iterable[str], window_s: float, now: float | None = None
    ) -> float:
        """Images per second for these models (kind "model") or workers (kind "worker")."""
        now = time.time() if now is None else now
        first, last = int((now - window_s) // THROUGHPUT_BUCKET_S), int(now // THROUGHPUT_BUCKET_S)
        buckets = range(first, last + 1)
        names = sorted(set(names))
        if not names:
            return 0.0
        per_bucket = self.ledger.stats.done_per_bucket(kind, names, buckets)
        total = sum(per_bucket)
        if total == 0:
            return 0.0
        start = next(b for b, count in zip(buckets, per_bucket, strict=True) if count)
        span = max(now - start * THROUGHPUT_BUCKET_S, float(THROUGHPUT_BUCKET_S))
        return total / span

    def worker_rate(self, worker_id: str) -> float:
        return self.throughput("worker", [worker_id], WORKER_RATE_WINDOW_S)

    def active(self) -> list[ActiveBatch]:
        """Unfinished batches; expired ones are dropped from the active set as they are seen."""
        return self._cached("active", self.ledger.stats.active_batches)

    def serving_models(self) -> frozenset[str]:
        """Models held by at least one live worker."""
        return self._cached("serving", self._read_serving)

    def model_rate(self, models: frozenset[str]) -> float:
        """Recent images/s of these models, over `throughput_window_s`."""
        window = self.settings.throughput_window_s
        return self._cached(("rate", models), lambda: self.throughput("model", models, window))

    def _read_serving(self) -> frozenset[str]:
        workers = self.ledger.workers.live()
        return frozenset(m for w in workers for m in w.get("models", []))

    def estimate(self, record: BatchRecord) -> Estimate:
        """Queue position, ETA and throughput for a batch record from `Ledger.batch`."""
        models = record.models
        rate = self.model_rate(models)
        remaining = record.remaining
        if remaining == 0:
            return Estimate(queue_position=None, eta_s=0.0, throughput=rate)
        priority, created = record.priority, record.created_at
        ahead = sum(
            other.queued
            for other in self.active()
            if other.batch_id != record.batch_id
            and other.models & models
            and (other.priority, -other.created_at) > (priority, -created)
        )
        position = ahead if record.counts["queued"] else 0
        eta = (ahead + remaining) / rate if rate > 0 else None
        return Estimate(queue_position=position, eta_s=eta, throughput=rate)
