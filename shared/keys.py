"""Every Redis key the farm uses, in one place."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


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

    def pending(self, compat: str) -> str:
        return f"{self.prefix}:pending:{compat}"  # list of queued job ids awaiting dispatch

    def pending_index(self, model: str) -> str:
        return f"{self.prefix}:pending-index:{model}"  # zset compat key -> first enqueue seq

    def pending_models(self) -> str:
        return f"{self.prefix}:pending-models"  # set of models with pending work

    def sequence(self) -> str:
        return f"{self.prefix}:seq"  # counter that orders pending keys

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
