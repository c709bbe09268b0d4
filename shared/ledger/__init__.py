"""The job ledger in Redis: the one place that reads and writes the farm's keys.

- `core`: the `Ledger` — batches, jobs, transitions, leases, cancels and retries.
- `records`: the typed records it reads (`JobRecord`, `BatchRecord`).
- `scripts`: its Lua scripts, templated from `shared.keys` so key names cannot drift.
- `pending`: the pending lanes and the dispatch policy's take.
- `workers`: the worker registry (heartbeats with a TTL); `Ledger.workers`.
- `loops`: the dispatch lock, and the ended batches with their finish claims; `Ledger.loops`.
- `deliveries`: the webhook delivery queue; `Ledger.webhooks`.
- `idempotency`: `Idempotency-Key` records of submissions; `Ledger.idempotency`.
- `rates`: each tenant's submits in its current window (`submits_per_minute`); `Ledger.rates`.
- `stats`: counts, depths and throughput for /metrics, ETAs and capacity; `Ledger.stats`.
- `outcomes`: the counters a job's end moves (per state, per failure reason, render times).
- `submit`: writing a new batch in pipelined slices and one transaction, all of it or none.
- `budget`: what a batch will take in Redis, and whether the ledger can afford it; `Ledger.budget`.
- `open_jobs`: each tenant's jobs not yet final, for `max_queued_jobs`; `Ledger.open_jobs`.
"""

from __future__ import annotations

from shared.ledger.core import Ledger, Transition
from shared.ledger.outcomes import RENDER_BUCKETS_S, THROUGHPUT_BUCKET_S, THROUGHPUT_KEEP_S
from shared.ledger.pending import Chunk
from shared.ledger.records import DEFAULT_TENANT, STATES, BatchRecord, JobRecord

__all__ = [
    "DEFAULT_TENANT",
    "RENDER_BUCKETS_S",
    "STATES",
    "THROUGHPUT_BUCKET_S",
    "THROUGHPUT_KEEP_S",
    "BatchRecord",
    "Chunk",
    "JobRecord",
    "Ledger",
    "Transition",
]
