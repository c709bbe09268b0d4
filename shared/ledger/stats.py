"""The farm's numbers, read for /metrics, ETAs, capacity and paging: typed values, no raw keys.

The counters behind them are written elsewhere: batch counters by TRANSITION, the `stats:*`
hashes and the throughput buckets by RECORD_OUTCOME (`shared.ledger.scripts`), the broker queues
by Celery. Everything here only reads, except that expired batches found in the active set are
dropped from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from shared.celery_app import model_queue
from shared.jobs import DEFAULT_PRIORITY, JobState
from shared.keys import Keys
from shared.keys import text as _s
from shared.ledger.pending import pending_count
from shared.ledger.records import DEFAULT_TENANT

__all__ = ["TENANT_OUTCOMES", "ActiveBatch", "RenderHistogram", "Stats"]

_STATES = [state.value for state in JobState]
# The ends RECORD_OUTCOME counts per tenant (`stats:tenant-{state}` hashes, tenant -> jobs).
TENANT_OUTCOMES = (JobState.SUCCEEDED.value, JobState.FAILED.value)


@dataclass(frozen=True)
class ActiveBatch:
    """An unfinished batch, as much of it as queue positions need."""

    batch_id: str
    created_at: float
    priority: int
    models: frozenset[str]
    queued: int
    running: int


@dataclass(frozen=True)
class RenderHistogram:
    """Render seconds: jobs per bucket upper bound (`"0.5"`, ..., `"+Inf"`; not cumulative)."""

    counts: dict[str, int]
    sum_s: float


class Stats:
    """Read-only views of the farm's counters (and a ping for /healthz)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def ping(self) -> bool:
        """True when Redis answers; raises redis.RedisError when it does not."""
        return bool(self.client.ping())

    # -- batches --------------------------------------------------------------------------------

    def batch_count(self, tenant: str | None = None) -> int:
        """Batches the ledger lists, of every tenant or of `tenant` (expired ones are dropped
        as pages are read)."""
        index = self.keys.batches() if tenant is None else self.keys.tenant_batches(tenant)
        return int(self.client.zcard(index))

    def job_counts(self, since: float) -> dict[str, int]:
        """Jobs by state, summed over the batches created since `since` (epoch seconds)."""
        totals = dict.fromkeys(_STATES, 0)
        for counts in self.job_counts_by_tenant(since).values():
            for state, count in counts.items():
                totals[state] += count
        return totals

    def job_counts_by_tenant(self, since: float) -> dict[str, dict[str, int]]:
        """Jobs by tenant and state, over the batches created since `since` (one scan)."""
        ids = self.client.zrangebyscore(self.keys.batches(), since, "+inf")
        pipe = self.client.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hmget(self.keys.batch(_s(batch_id)), ["tenant", *_STATES])
        out: dict[str, dict[str, int]] = {}
        for tenant, *row in pipe.execute():
            if row[0] is None:
                continue  # expired between the two reads
            totals = out.setdefault(
                _s(tenant) if tenant else DEFAULT_TENANT, dict.fromkeys(_STATES, 0)
            )
            for state, value in zip(_STATES, row, strict=True):
                totals[state] += int(value or 0)
        return out

    def active_batch_count(self) -> int:
        """Batches not yet ended."""
        return int(self.client.zcard(self.keys.active_batches()))

    def active_batches(self) -> list[ActiveBatch]:
        """Unfinished batches; expired ones are dropped from the active set as they are seen."""
        ids = [_s(v) for v in self.client.zrange(self.keys.active_batches(), 0, -1)]
        fields = ["created_at", "priority", "models", "queued", "running"]
        pipe = self.client.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hmget(self.keys.batch(batch_id), fields)
        out, gone = [], []
        for batch_id, row in zip(ids, pipe.execute(), strict=True):
            if row[0] is None:
                gone.append(batch_id)
                continue
            created, priority, models, queued, running = (_s(v) if v else "" for v in row)
            out.append(
                ActiveBatch(
                    batch_id=batch_id,
                    created_at=float(created),
                    priority=int(priority or DEFAULT_PRIORITY),
                    models=frozenset(m for m in models.split(",") if m),
                    queued=int(queued or 0),
                    running=int(running or 0),
                )
            )
        if gone:
            self.client.zrem(self.keys.active_batches(), *gone)
        return out

    # -- throughput and outcomes ----------------------------------------------------------------

    def done_per_bucket(self, kind: str, names: Sequence[str], buckets: range) -> list[int]:
        """Jobs that succeeded in each throughput bucket, summed over these models or workers
        (`kind` "model" or "worker"); one MGET."""
        if not names or not buckets:
            return [0] * len(buckets)
        keys = [self.keys.done_bucket(kind, n, b) for n in names for b in buckets]
        values = [int(v or 0) for v in self.client.mget(keys)]
        return [sum(values[i :: len(buckets)]) for i in range(len(buckets))]

    def render_histogram(self) -> RenderHistogram:
        """The render-time histogram of the jobs that succeeded."""
        raw = self._hash("render")
        counts = {k: int(v) for k, v in raw.items() if k not in ("sum", "count")}
        return RenderHistogram(counts=counts, sum_s=float(raw.get("sum", 0.0)))

    def outcomes(self) -> dict[str, int]:
        """Jobs that ended succeeded / failed since the ledger began."""
        return {k: int(v) for k, v in self._hash("outcomes").items()}

    def failures(self) -> dict[str, int]:
        """Failed jobs by reason (a short, bounded label such as `worker_lost`)."""
        return {k: int(v) for k, v in self._hash("failures").items()}

    def submitted(self) -> dict[str, int]:
        """Jobs submitted per tenant since the ledger began."""
        return {k: int(v) for k, v in self._hash("submitted").items()}

    def tenant_outcomes(self) -> dict[str, dict[str, int]]:
        """Jobs that ended succeeded / failed per tenant, since the ledger began."""
        out: dict[str, dict[str, int]] = {}
        for state in TENANT_OUTCOMES:
            for tenant, count in self._hash(f"tenant-{state}").items():
                out.setdefault(tenant, {})[state] = int(count)
        return out

    def tenant_render_s(self) -> dict[str, float]:
        """Seconds of batched passes spent on each tenant's succeeded jobs."""
        return {k: float(v) for k, v in self._hash("tenant-render-s").items()}

    def _hash(self, name: str) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.client.hgetall(self.keys.stats(name)).items()}

    # -- queues ---------------------------------------------------------------------------------

    def pending_jobs(self, model: str) -> int:
        """Jobs waiting in `model`'s pending lanes (cancelled ones count until skipped)."""
        return pending_count(self.client, self.keys, model)

    def broker_depth(self, model: str) -> int:
        """Chunks sent to `model`'s Celery queue and not yet taken by a worker."""
        return int(self.client.llen(model_queue(model)))

    def broker_depths(self, models: Iterable[str]) -> dict[str, int]:
        """`broker_depth` of many models in one round trip."""
        names = list(models)
        pipe = self.client.pipeline(transaction=False)
        for model in names:
            pipe.llen(model_queue(model))
        return {model: int(n) for model, n in zip(names, pipe.execute(), strict=True)}
