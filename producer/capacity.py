"""What each model's queue asks of the farm: the signal an autoscaler adds or removes GPUs by.

Per model: the jobs waiting in the ledger, the chunks waiting in its Celery queue, the live workers
that serve it, their recent images/s, and the time to drain at that rate. `/metrics` exports
these; the API also uses `unserved_note` to say when a job waits for a model no worker serves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.ledger import Ledger

__all__ = ["ModelCapacity", "model_capacity", "unserved_note"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCapacity:
    """One model's queue against the workers that serve it."""

    model: str
    pending_jobs: int  # queued in the ledger, not yet sent to a worker
    queued_chunks: int  # sent, waiting in the model's Celery queue
    workers: int  # live workers that hold the model
    images_per_s: float  # those workers' recent throughput
    drain_s: float | None  # time to render what waits at that rate; None when nothing serves it


def _heartbeat_rate(worker: dict[str, Any]) -> float:
    return float(worker.get("images_per_s") or 0.0)


def model_capacity(
    ledger: Ledger,
    models: Iterable[str],
    *,
    max_batch: int,
    worker_rate: Callable[[dict[str, Any]], float] = _heartbeat_rate,
) -> list[ModelCapacity]:
    """Capacity per model (the configured ones and any with pending work).

    `worker_rate` gives one live worker's images/s from its registry record; by default the
    rate its heartbeat publishes. A worker serving several models counts its whole rate for each:
    the estimate is for adding machines, where that errs towards enough.
    """
    workers = ledger.workers.live()
    names = sorted(set(models) | set(ledger.pending_models()))
    out = []
    for model in names:
        serving = [w for w in workers if model in w.get("models", [])]
        pending = ledger.stats.pending_jobs(model)
        chunks = ledger.stats.broker_depth(model)
        rate = sum(worker_rate(w) for w in serving)
        # A queued chunk holds at most max_batch jobs: the drain time errs long, never short.
        waiting = pending + chunks * max_batch
        drain = waiting / rate if rate > 0 else (0.0 if waiting == 0 else None)
        out.append(
            ModelCapacity(
                model=model,
                pending_jobs=pending,
                queued_chunks=chunks,
                workers=len(serving),
                images_per_s=rate,
                drain_s=drain,
            )
        )
    return out


def unserved_note(
    serving: Callable[[], Collection[str]], models: Sequence[str], state_counts: dict[str, int]
) -> str | None:
    """Why queued work is not moving, when the reason is that no live worker holds its model.

    `serving()` gives the models live workers hold (`QueueView.serving_models`); it is called
    only when some of the work is queued.
    """
    if not state_counts.get("queued"):
        return None
    missing = sorted(set(models) - set(serving()))
    if not missing:
        return None
    names = ", ".join(repr(m) for m in missing)
    return (
        f"no live worker serves model {names}; its jobs stay queued until a worker that "
        "holds it starts (sdfarm worker --model NAME=PATH)"
    )
