"""Farm-wide counters of how jobs ended, written after each final transition: /metrics reads
them (`Stats`), ETAs read the throughput buckets (`producer.eta`).

Kept apart from TRANSITION so that the compare-and-set stays small; best effort, since the
transition already stands when they are counted.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from shared.errors import FailureReason
from shared.jobs import JobState
from shared.keys import Keys
from shared.ledger.scripts import RECORD_OUTCOME

__all__ = ["RENDER_BUCKETS_S", "THROUGHPUT_BUCKET_S", "THROUGHPUT_KEEP_S", "Outcomes"]

log = logging.getLogger(__name__)

THROUGHPUT_BUCKET_S = 10  # finished images are counted per model and worker in 10 s buckets
THROUGHPUT_KEEP_S = 3600  # ... kept an hour: ETAs and images/s look at recent buckets only
# Upper bounds (seconds) of the render-time histogram buckets: a tiny CPU pass to a slow big one.
RENDER_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Outcomes:
    """Counts a job's end: per state, failures per reason code, render times, throughput."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._script = client.register_script(RECORD_OUTCOME)

    def record(self, job_id: str, to: JobState, fields: dict[str, Any]) -> None:
        """Count `job_id` ending `to`, with the fields its transition wrote."""
        timings = fields.get("timings") or {}
        render_s = sum(v for k, v in timings.items() if k != "batch_rows")
        le = next((str(b) for b in RENDER_BUCKETS_S if render_s <= b), "+Inf") if timings else ""
        reason = str(fields.get("reason") or FailureReason.OTHER.value)
        bucket = int(time.time() // THROUGHPUT_BUCKET_S)
        ttl = int(THROUGHPUT_KEEP_S + THROUGHPUT_BUCKET_S)
        try:
            args = [self.keys.prefix, job_id, to.value, bucket, ttl, le, render_s, reason]
            self._script(args=args)
        except redis.RedisError as e:
            log.warning("job %s: could not record its outcome for metrics: %s", job_id, e)
