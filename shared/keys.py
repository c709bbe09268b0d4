"""Every Redis key the farm uses, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Keys", "text"]


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix, so two farms (or two tests) can share a Redis."""

    prefix: str = "sdfarm"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"  # hash: state, spec, seed, progress, result...

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"  # hash: total and one counter per state

    def batch_jobs(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}:jobs"  # list of job ids, submit order

    def batches(self) -> str:
        return f"{self.prefix}:batches"  # zset batch id -> created_at, newest last

    def tenant_batches(self, tenant: str) -> str:
        # zset batch id -> created_at of one tenant's batches; like `batches`, no TTL, and ids
        # whose record expired are dropped as pages are read
        return f"{self.prefix}:tenant:{tenant}:batches"

    # Pending work (see `shared.ledger.pending`): one list of job ids per (compat key,
    # batch), indexed three ways. The Lua scripts build these names from these methods.

    def pending_jobs(self, compat: str, batch_id: str) -> str:
        return f"{self.prefix}:pending:{compat}:{batch_id}"  # list: the batch's queued job ids

    def pending(self, compat: str) -> str:
        return f"{self.prefix}:pending:{compat}"  # zset batch id -> arrival seq, for grouping

    def batch_pending(self, model: str, batch_id: str) -> str:
        return f"{self.prefix}:batch-pending:{model}:{batch_id}"  # zset compat -> arrival seq

    def turns(self, model: str) -> str:
        # zset batch id -> priority class * 2^40 + turn: one model's turns before they were kept
        # per tenant; TAKE_CHUNK moves what a farm from before that still holds
        return f"{self.prefix}:turns:{model}"

    def tenant_turns(self, model: str) -> str:
        # zset tenant -> its pass (jobs taken / weight): tenants with pending work for a model
        return f"{self.prefix}:tenant-turns:{model}"

    def batch_turns(self, model: str, tenant: str) -> str:
        # zset batch id -> priority class * 2^40 + turn: one tenant's batches waiting for a model
        return f"{self.prefix}:batch-turns:{model}:{tenant}"

    def tenant_pending(self, tenant: str, compat: str) -> str:
        return f"{self.prefix}:tenant-pending:{tenant}:{compat}"  # zset batch id -> arrival seq

    def tenant_pass(self, model: str) -> str:
        return f"{self.prefix}:tenant-pass:{model}"  # hash tenant -> pass kept while it has none

    def fair_clock(self, model: str) -> str:
        return f"{self.prefix}:fair-clock:{model}"  # the pass of the tenant served last

    def tenant_open(self, tenant: str) -> str:
        # counter: the tenant's jobs not yet final (queued or running), for `max_queued_jobs`
        return f"{self.prefix}:tenant:{tenant}:open"

    def pending_since(self) -> str:
        return f"{self.prefix}:pending-since"  # hash compat -> when its oldest waiting job came

    def pending_models(self) -> str:
        return f"{self.prefix}:pending-models"  # set of models with pending work

    def sequence(self) -> str:
        return f"{self.prefix}:seq"  # counter that orders arrivals and turns

    def inflight(self) -> str:
        return f"{self.prefix}:inflight"  # zset job id -> time sent to a Celery queue

    def leases(self) -> str:
        return f"{self.prefix}:leases"  # zset job id -> lease expiry, for running jobs

    def wake(self) -> str:
        return f"{self.prefix}:wake"  # list; a push wakes the dispatcher at once

    def dispatcher_lock(self) -> str:
        return f"{self.prefix}:dispatcher:lock"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"  # hash with a TTL: the worker's heartbeat

    def workers(self) -> str:
        return f"{self.prefix}:workers"  # set of worker ids seen (pruned when records expire)

    def gpu_claim(self, gpu_uuid: str) -> str:
        return f"{self.prefix}:gpu-claim:{gpu_uuid}"  # string with a TTL: the supervisor using it

    def finished(self) -> str:
        return f"{self.prefix}:finished"  # list of batch ids that just ended (TRANSITION pushes)

    def finishing(self) -> str:
        # list: batch ids a finisher from before finish claims was handling; drained at start
        return f"{self.prefix}:finishing"

    def finish_claims(self) -> str:
        # zset batch id -> when its finisher's claim lapses (Redis time): ends being handled now
        return f"{self.prefix}:finish-claims"

    def finish_owners(self) -> str:
        return f"{self.prefix}:finish-owners"  # hash batch id -> the finisher holding its claim

    def active_batches(self) -> str:
        return f"{self.prefix}:active"  # zset batch id -> created_at, batches not yet ended

    def idempotency(self, scope: str, key: str) -> str:
        return f"{self.prefix}:idem:{scope}:{key}"  # hash: batch id, body hash; status TTL

    def submit_rate(self, tenant: str) -> str:
        # counter with a TTL: the tenant's submits in its current fixed window (ledger.rates)
        return f"{self.prefix}:rate:submits:{tenant}"

    def done_bucket(self, kind: str, name: str, bucket: int) -> str:
        # counter of jobs that succeeded in one THROUGHPUT_BUCKET_S bucket, per model or worker
        return f"{self.prefix}:done:{kind}:{name}:{bucket}"

    def stats(self, name: str) -> str:
        return f"{self.prefix}:stats:{name}"  # hashes of farm-wide counters, for /metrics

    def webhooks(self) -> str:
        return f"{self.prefix}:webhooks"  # zset delivery JSON -> when it is due


def text(value: Any) -> str:
    """A value read from Redis as text (the farm's clients return bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
