"""The job ledger in Redis: the one place that reads and writes the farm's keys.

- `core`: the `Ledger` — batches, jobs, transitions, leases, cancels and retries.
- `records`: the typed records it reads (`JobRecord`, `BatchRecord`).
- `scripts`: its Lua scripts, templated from `shared.keys` so key names cannot drift.
- `pending`: the pending lanes and the dispatch policy's take.
- `workers`: the worker registry (heartbeats with a TTL).
"""

from __future__ import annotations

from shared.ledger.core import (
    RENDER_BUCKETS_S,
    STATES,
    THROUGHPUT_BUCKET_S,
    THROUGHPUT_KEEP_S,
    Chunk,
    Ledger,
    Transition,
    failure_reason,
)

__all__ = [
    "RENDER_BUCKETS_S",
    "STATES",
    "THROUGHPUT_BUCKET_S",
    "THROUGHPUT_KEEP_S",
    "Chunk",
    "Ledger",
    "Transition",
    "failure_reason",
]
