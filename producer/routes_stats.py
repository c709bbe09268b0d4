"""GET /v1/stats/throughput: each model's queue depth now and images per minute over the last
hour, the numbers behind the dashboard's chart.

Both are farm-wide whoever asks, as /v1/workers is: a tenant shares the farm's models, and how
long its jobs wait depends on everyone's queue, not only on its own. The per-minute counts are
sums of the ledger's 10-second throughput buckets (`shared.ledger.outcomes`), which expire after
an hour, so nothing is kept for this route alone.
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from pydantic import BaseModel, Field

from producer.farm import GUARDED, FarmDep
from producer.schemas import errors
from shared.ledger import THROUGHPUT_BUCKET_S, THROUGHPUT_KEEP_S

__all__ = ["ModelThroughput", "Throughput", "per_minute", "router"]

MINUTE_S = 60
MINUTES = THROUGHPUT_KEEP_S // MINUTE_S  # the buckets live an hour: one point a minute
BUCKETS_PER_MINUTE = MINUTE_S // THROUGHPUT_BUCKET_S

router = APIRouter(dependencies=GUARDED, responses=errors(401, 503))


class ModelThroughput(BaseModel):
    model: str
    queued: int = Field(description="Jobs waiting in the dispatcher's lanes for this model.")
    dispatched_chunks: int = Field(description="Chunks sent to its queue, not yet taken.")
    images_per_minute: list[int] = Field(
        description="Images finished in each of the last 60 minutes, oldest first; the last "
        "is the current (partial) minute."
    )
    images_per_s: float = Field(description="Over the whole hour shown.")


class Throughput(BaseModel):
    minute_s: int = MINUTE_S
    ends_at: float = Field(description="Epoch seconds the last minute ends at.")
    models: list[ModelThroughput]


@router.get("/v1/stats/throughput", response_model=Throughput, tags=["stats"])
def throughput(f: FarmDep) -> Throughput:
    """Per model: queue depth now and images per minute over the last hour (farm-wide)."""
    now = time.time()
    serving = f.queue.serving_models()
    active = {m for batch in f.queue.active() for m in batch.models}
    names = sorted(set(f.settings.model_names()) | serving | active)
    depths = f.ledger.stats.broker_depths(names)
    models = []
    for name in names:
        minutes = per_minute(f.ledger.stats.done_per_bucket("model", [name], _buckets(now)))
        models.append(
            ModelThroughput(
                model=name,
                queued=f.ledger.stats.pending_jobs(name),
                dispatched_chunks=depths[name],
                images_per_minute=minutes,
                images_per_s=round(sum(minutes) / THROUGHPUT_KEEP_S, 4),
            )
        )
    last_end = (int(now // THROUGHPUT_BUCKET_S) + 1) * THROUGHPUT_BUCKET_S
    return Throughput(ends_at=float(last_end), models=models)


def _buckets(now: float) -> range:
    """The last MINUTES * BUCKETS_PER_MINUTE buckets, the current one last."""
    last = int(now // THROUGHPUT_BUCKET_S)
    return range(last - MINUTES * BUCKETS_PER_MINUTE + 1, last + 1)


def per_minute(buckets: list[int]) -> list[int]:
    """Sums of consecutive BUCKETS_PER_MINUTE buckets: 10-second counts to per-minute ones."""
    step = BUCKETS_PER_MINUTE
    return [sum(buckets[i : i + step]) for i in range(0, len(buckets), step)]
