"""The job ledger in Redis: the system of record for every job and batch.

Every state change goes through one Lua compare-and-set (`scripts.TRANSITION`) that also moves
the batch counters, so `queued + running + succeeded + failed + cancelled == total` at every
instant. Terminal states are final. Job and batch records expire `status_ttl_s` after their last
write; the pending lists, the in-flight set and the leases never expire. Leases, arrival times and
batching waits are judged by Redis's clock (`TIME`), never by the clocks of the hosts that call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from redis.client import Pipeline

from shared.errors import UnknownId
from shared.jobs import JobSpec, JobState
from shared.keys import Keys
from shared.keys import text as _s
from shared.ledger.budget import Budget
from shared.ledger.deliveries import WebhookQueue
from shared.ledger.idempotency import IdempotencyKeys
from shared.ledger.leases import Leases
from shared.ledger.loops import Loops
from shared.ledger.open_jobs import OpenJobs
from shared.ledger.outcomes import Outcomes
from shared.ledger.rates import SubmitRates
from shared.ledger.records import (
    DEFAULT_TENANT,
    BatchRecord,
    JobRecord,
    decode_batch,
    decode_job,
    unknown_batch,
    unknown_job,
)
from shared.ledger.replication import wait_for_replicas
from shared.ledger.scripts import COMMIT_JOBS, RENEW_LEASES, RETRY_JOBS, TAKE_CHUNK, TRANSITION
from shared.ledger.stats import Stats
from shared.ledger.submit import UNCOMMITTED_TTL_S, BatchPlan, plan_batch, write_batch
from shared.ledger.transitions import Transition, Transitions
from shared.ledger.workers import Workers

__all__ = ["Ledger", "Transition"]

log = logging.getLogger(__name__)

_ID_SLICE = 2000  # job ids per round trip while walking a big batch


class Ledger(Transitions, Leases):
    """Reads and writes job and batch records. Built from a Redis client and the settings.

    Its state changes are in `shared.ledger.transitions`, its dispatch and leases in
    `shared.ledger.leases`; the loops, webhooks, idempotency, submit rates, stats and worker
    registry are attributes of their own.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        status_ttl_s: int,
        lease_s: float,
        keys: Keys | None = None,
        uncommitted_ttl_s: int = UNCOMMITTED_TTL_S,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.redis = client
        self.keys = keys or Keys()
        self.status_ttl_s = status_ttl_s
        self.lease_s = lease_s
        self.uncommitted_ttl_s = uncommitted_ttl_s  # a job record's TTL until its batch commits
        # Replicas that must hold a batch before create_batch returns (shared/ledger/replication)
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        self._transition = client.register_script(TRANSITION)
        self._take_chunk = client.register_script(TAKE_CHUNK)
        self._renew = client.register_script(RENEW_LEASES)
        self._retry = client.register_script(RETRY_JOBS)
        self._commit_jobs = client.register_script(COMMIT_JOBS)
        self._outcomes = Outcomes(client, self.keys)  # /metrics and ETA counters
        self.loops = Loops(client, self.keys)  # the dispatch lock, the ended-batch lists
        self.webhooks = WebhookQueue(client, self.keys)  # webhook deliveries waiting or retrying
        self.idempotency = IdempotencyKeys(client, self.keys)  # Idempotency-Key -> batch
        self.rates = SubmitRates(client, self.keys)  # each tenant's submits in its window
        self.stats = Stats(client, self.keys)  # counts and depths for /metrics, ETAs, capacity
        self.workers = Workers(client, self.keys)  # the worker registry (heartbeats)
        self.budget = Budget(client, self.keys)  # whether a batch fits the ledger's budget
        self.open_jobs = OpenJobs(client, self.keys)  # each tenant's jobs not yet final

    def close(self) -> None:
        """Close the ledger's connections (the API process's, at shutdown)."""
        self.redis.close()

    # -- submit ---------------------------------------------------------------------------------

    def plan_batch(
        self, batch_id: str, specs: Sequence[JobSpec], meta: dict[str, str] | None = None
    ) -> BatchPlan:
        """The batch encoded, with the bytes it will take (for `budget.check`); nothing is
        written."""
        return plan_batch(batch_id, specs, meta)

    def create_batch(
        self,
        batch_id: str,
        specs: Sequence[JobSpec],
        *,
        meta: dict[str, str] | None = None,
        tenant: str = DEFAULT_TENANT,
        plan: BatchPlan | None = None,
        max_open: int | None = None,
    ) -> list[str]:
        """Write a batch's jobs as `queued`, then make the batch visible and pending in one step
        (`plan`: the same batch from `plan_batch`, so it is not encoded twice).

        Jobs are written first in slices with a short TTL; the batch record (which records
        `tenant`), the batch lists, the pending lists and the jobs' full TTL follow in one
        transaction. A Redis error half way deletes what was written (LedgerFull when Redis is
        out of memory); a crash half way leaves only invisible job records that soon expire.
        With `max_open`, RateLimited (nothing written) when the tenant's jobs not yet final
        would pass it (`Ledger.open_jobs`).
        """
        if plan is None:
            plan = plan_batch(batch_id, specs, meta)
        assert plan.batch_id == batch_id and len(plan.job_ids) == len(specs)
        now = repr(self.server_time())  # arrival times feed the batching wait: Redis's clock
        try:
            job_ids = write_batch(
                self.redis,
                self.keys,
                plan,
                meta=meta,
                now=now,
                ttl_s=self.status_ttl_s,
                uncommitted_ttl_s=self.uncommitted_ttl_s,
                commit_jobs=self._commit_jobs,
                wake=self.wake,
                tenant=tenant,
                max_open=max_open,
            )
        except Exception:
            self.budget.forget()  # what Redis holds is no longer what the budget counted
            raise
        if self.wait_replicas:
            wait = self.wait_replicas, self.wait_timeout_ms
            wait_for_replicas(self.redis, self.keys, batch_id, *wait, ttl_s=self.status_ttl_s)
        return job_ids

    # -- reads ----------------------------------------------------------------------------------
    def job(self, job_id: str) -> JobRecord:
        """The job's record, decoded; raises UnknownId when it does not exist."""
        raw = self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            raise unknown_job(job_id)
        return decode_job(job_id, raw)

    def jobs(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """Many records in one round trip; a missing one is None."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.job(job_id))
        return [
            decode_job(job_id, raw) if raw else None
            for job_id, raw in zip(job_ids, pipe.execute(), strict=True)
        ]

    def batch(self, batch_id: str) -> BatchRecord:
        """The batch's counters (O(1) whatever its size); raises UnknownId when unknown."""
        raw = self.redis.hgetall(self.keys.batch(batch_id))
        if not raw:
            raise unknown_batch(batch_id)
        return decode_batch(batch_id, raw)

    def batch_owners(self, batch_ids: Sequence[str]) -> list[str | None]:
        """The tenant of each batch, in one round trip; None where the batch does not exist.

        One read whether the batch is the caller's, another tenant's or missing, so the API's
        answer takes as long either way.
        """
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hmget(self.keys.batch(batch_id), ["total", "tenant"])
        return [
            None if total is None else _s(tenant) if tenant else DEFAULT_TENANT
            for total, tenant in pipe.execute()
        ]

    def batch_job_ids(self, batch_id: str, start: int = 0, stop: int = -1) -> list[str]:
        return [_s(v) for v in self.redis.lrange(self.keys.batch_jobs(batch_id), start, stop)]

    def request_cancel(self, job_id: str) -> str:
        """Cancel a job: queued ones at once, running ones at their next sampling step."""
        result = self.transition(
            job_id, [JobState.QUEUED], JobState.CANCELLED, {"error": "cancelled"}
        )
        if result.applied:
            return JobState.CANCELLED.value
        if result.previous == JobState.RUNNING.value:
            self.redis.hset(self.keys.job(job_id), "cancel_requested", "1")
        return result.previous

    def cancel_batch(self, batch_id: str) -> dict[str, int]:
        """Cancel every job of a batch: queued ones at once, running ones at their next step.

        Returns how many were cancelled now and how many running ones were asked to stop.
        """
        self.batch(batch_id)  # UnknownId for an unknown batch
        self.redis.hset(self.keys.batch(batch_id), "cancelled_at", repr(time.time()))
        out = {"cancelled": 0, "stopping": 0}
        for ids in self._id_slices(batch_id):
            pipe = self.redis.pipeline(transaction=False)
            fields = {"error": "cancelled", "finished_at": time.time()}
            for job_id in ids:
                args = self._transition_args(job_id, [JobState.QUEUED], JobState.CANCELLED, fields)
                self._transition(args=args, client=pipe)
            running = []
            for job_id, (code, previous, *_) in zip(ids, pipe.execute(), strict=True):
                out["cancelled"] += code == 1
                if code == 0 and _s(previous) == JobState.RUNNING.value:
                    running.append(job_id)
            if running:
                pipe = self.redis.pipeline(transaction=False)
                for job_id in running:
                    pipe.hset(self.keys.job(job_id), "cancel_requested", "1")
                pipe.execute()
                out["stopping"] += len(running)
        return out

    def retry_batch(self, batch_id: str) -> int:
        """Re-queue the batch's failed and cancelled jobs with their original seeds; how many."""
        self.batch(batch_id)
        moved = 0
        ttl = self.status_ttl_s
        for ids in self._id_slices(batch_id):
            args: list[Any] = [self.keys.prefix, batch_id, ttl, *ids]
            moved += int(self._retry(args=args))
        return moved

    def iter_jobs(self, batch_id: str) -> Iterator[list[JobRecord]]:
        """The batch's job records in submit order, a slice at a time (for manifests)."""
        for ids in self._id_slices(batch_id):
            yield [record for record in self.jobs(ids) if record is not None]

    def job_states(self, job_ids: Sequence[str]) -> list[str | None]:
        """Only the states of many jobs, in one round trip (for filtered paging)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "state")
        return [None if v is None else _s(v) for v in pipe.execute()]

    def batches_page(
        self, offset: int, limit: int, *, tenant: str | None = None
    ) -> list[BatchRecord]:
        """Batches newest first, of every tenant or of `tenant` alone (its own index, not a
        filtered page); forgets ids whose record expired."""
        index = self.keys.batches() if tenant is None else self.keys.tenant_batches(tenant)
        ids = [_s(v) for v in self.redis.zrevrange(index, offset, offset + limit - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in ids:
            pipe.exists(self.keys.batch(batch_id))
        alive = [batch_id for batch_id, ok in zip(ids, pipe.execute(), strict=True) if ok]
        if len(alive) < len(ids):
            self.redis.zrem(index, *(set(ids) - set(alive)))
        out = []
        for batch_id in alive:
            with contextlib.suppress(UnknownId):  # expired between the two reads
                out.append(self.batch(batch_id))
        return out

    def _id_slices(self, batch_id: str) -> Iterator[list[str]]:
        start = 0
        while ids := self.batch_job_ids(batch_id, start, start + _ID_SLICE - 1):
            yield ids
            start += len(ids)

    # -- waking the dispatcher ------------------------------------------------------------------

    def wake(self, pipe: Pipeline | None = None) -> None:
        """Wake the dispatcher now: work arrived or a queue slot opened (in `pipe` if given).

        The list holds at most one push: a wake is a fact, not a count, and must not pile up.
        """
        target = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        target.lpush(self.keys.wake(), "1")
        target.ltrim(self.keys.wake(), 0, 0)
        if pipe is None:
            target.execute()

    def wait_for_wake(self, timeout_s: float) -> bool:
        """Block until a wake (True) or `timeout_s` passes (False); the push is consumed."""
        # BLPOP reads 0 as "forever": the shortest real wait instead.
        return self.redis.blpop([self.keys.wake()], timeout=max(0.001, timeout_s)) is not None
