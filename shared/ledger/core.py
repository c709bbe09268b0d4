"""The job ledger in Redis: the system of record for every job and batch.

Every state change goes through one Lua compare-and-set (`shared.lua.TRANSITION`) that also moves
the batch counters, so `queued + running + succeeded + failed + cancelled == total` at every
instant. Terminal states are final. Job and batch records expire `status_ttl_s` after their last
write; the pending lists, the in-flight set and the leases never expire.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from shared.errors import IllegalTransition, UnknownId
from shared.jobs import JobSpec, JobState, batch_of, compat_key, job_id_for
from shared.keys import Keys
from shared.keys import text as _s
from shared.ledger.pending import (
    Chunk,
    Take,
    parse_priority,
    pending_count,
    queue_pending,
    take_chunk,
)
from shared.ledger.scripts import RECORD_OUTCOME, RENEW_LEASES, RETRY_JOBS, TAKE_CHUNK, TRANSITION

__all__ = [
    "RENDER_BUCKETS_S",
    "THROUGHPUT_BUCKET_S",
    "THROUGHPUT_KEEP_S",
    "Chunk",
    "Ledger",
    "Transition",
    "failure_reason",
]

log = logging.getLogger(__name__)

STATES = [state.value for state in JobState]
_SUBMIT_SLICE = 2000  # jobs per pipeline round trip while writing a big batch
THROUGHPUT_BUCKET_S = 10  # finished images are counted per model and worker in 10 s buckets
THROUGHPUT_KEEP_S = 3600  # ... kept an hour: ETAs and images/s look at recent buckets only
# Upper bounds (seconds) of the render-time histogram buckets: a tiny CPU pass to a slow big one.
RENDER_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class Transition:
    """What a compare-and-set did: `applied`, the state it found, and whether the batch ended."""

    applied: bool
    previous: str
    batch_done: bool


class Ledger:
    """Reads and writes job and batch records. Built from a Redis client and the settings."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        status_ttl_s: int,
        lease_s: float,
        keys: Keys | None = None,
    ) -> None:
        self.redis = client
        self.keys = keys or Keys()
        self.status_ttl_s = status_ttl_s
        self.lease_s = lease_s
        self._transition = client.register_script(TRANSITION)
        self._take_chunk = client.register_script(TAKE_CHUNK)
        self._renew = client.register_script(RENEW_LEASES)
        self._retry = client.register_script(RETRY_JOBS)
        self._outcome = client.register_script(RECORD_OUTCOME)

    # -- submit ---------------------------------------------------------------------------------

    def create_batch(
        self, batch_id: str, specs: Sequence[JobSpec], *, meta: dict[str, str] | None = None
    ) -> list[str]:
        """Write a batch's jobs as `queued`, then make the batch visible and pending in one step.

        Jobs are written first in slices; the batch record and the pending lists follow in one
        transaction, so a crash half way leaves only invisible job records that expire.
        """
        now = repr(time.time())
        ttl = self.status_ttl_s
        priority = parse_priority(meta)
        job_ids = [job_id_for(batch_id, i) for i in range(len(specs))]
        by_compat: dict[str, list[str]] = {}
        models: dict[str, str] = {}
        queued = JobState.QUEUED.value
        for start in range(0, len(specs), _SUBMIT_SLICE):
            pipe = self.redis.pipeline(transaction=False)
            for job_id, spec in zip(
                job_ids[start : start + _SUBMIT_SLICE],
                specs[start : start + _SUBMIT_SLICE],
                strict=True,
            ):
                compat = compat_key(spec)
                assert spec.model is not None and spec.seed is not None
                by_compat.setdefault(compat, []).append(job_id)
                models[compat] = spec.model
                key = self.keys.job(job_id)
                # HSET spelled out: `hset(mapping=...)` rebuilds these arguments for every job,
                # which was a fifth of the time to accept a big batch. (redis-py leaves
                # execute_command untyped.)
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    "HSET", key, "state", queued, "batch_id", batch_id,
                    "spec", spec.model_dump_json(), "model", spec.model, "compat", compat,
                    "seed", spec.seed, "attempts", 0, "created_at", now, "updated_at", now,
                )  # fmt: skip
                pipe.execute_command("EXPIRE", key, ttl)  # type: ignore[no-untyped-call]
            pipe.execute()
        # One arrival number per compat key: it orders the batch's groups and gives its turn.
        last_seq = self.redis.incrby(self.keys.sequence(), len(by_compat))
        pipe = self.redis.pipeline(transaction=True)
        batch_key = self.keys.batch(batch_id)
        record: dict[Any, Any] = {"total": len(specs), "created_at": now, **(meta or {})}
        record |= {"priority": priority, "models": ",".join(sorted(set(models.values())))}
        record |= {state: 0 for state in STATES} | {JobState.QUEUED.value: len(specs)}
        pipe.hset(batch_key, mapping=record)
        pipe.expire(batch_key, ttl)
        for start in range(0, len(job_ids), _SUBMIT_SLICE):
            pipe.rpush(self.keys.batch_jobs(batch_id), *job_ids[start : start + _SUBMIT_SLICE])
        pipe.expire(self.keys.batch_jobs(batch_id), ttl)
        pipe.zadd(self.keys.batches(), {batch_id: float(now)})
        lanes = {compat: (models[compat], ids) for compat, ids in by_compat.items()}
        first_seq = last_seq - len(by_compat) + 1
        queue_pending(
            pipe, self.keys, batch_id, lanes, priority=priority, first_seq=first_seq, now=now
        )
        pipe.lpush(self.keys.wake(), "1")
        pipe.ltrim(self.keys.wake(), 0, 0)
        pipe.execute()
        return job_ids

    # -- reads ----------------------------------------------------------------------------------

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's record, decoded; raises UnknownId when it does not exist."""
        raw = self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            raise UnknownId(f"no job {job_id!r}")
        record: dict[str, Any] = {_s(k): _s(v) for k, v in raw.items()}
        record["job_id"] = job_id
        for name in ("spec", "result", "timings", "warnings"):
            if name in record:
                record[name] = json.loads(record[name])
        for name in ("attempts", "seed", "step", "steps", "dispatches"):
            if name in record:
                record[name] = int(record[name])
        return record

    def jobs(self, job_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Many records in one round trip; a missing one is None."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.job(job_id))
        out: list[dict[str, Any] | None] = []
        for job_id, raw in zip(job_ids, pipe.execute(), strict=True):
            out.append(self.job(job_id) if raw else None)
        return out

    def batch(self, batch_id: str) -> dict[str, Any]:
        """The batch's counters (O(1) whatever its size); raises UnknownId when unknown."""
        raw = self.redis.hgetall(self.keys.batch(batch_id))
        if not raw:
            raise UnknownId(f"no batch {batch_id!r}")
        record = {_s(k): _s(v) for k, v in raw.items()}
        counts = {state: int(record.pop(state, 0)) for state in STATES}
        return {"batch_id": batch_id, "total": int(record.pop("total")), "counts": counts, **record}

    def batch_job_ids(self, batch_id: str, start: int = 0, stop: int = -1) -> list[str]:
        return [_s(v) for v in self.redis.lrange(self.keys.batch_jobs(batch_id), start, stop)]

    # -- transitions ----------------------------------------------------------------------------

    def transition(
        self,
        job_id: str,
        allowed_from: Iterable[JobState],
        to: JobState,
        fields: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
    ) -> Transition:
        """Move a job to `to` if it is in one of `allowed_from`; raise UnknownId if it is gone.

        With `owner`, the change also needs the job to be held by that worker.
        """
        args = self._transition_args(job_id, allowed_from, to, fields, owner=owner)
        code, previous, done = self._transition(args=args)
        if code == -1:
            raise UnknownId(f"no job {job_id!r}")
        if code == 1 and to in (JobState.SUCCEEDED, JobState.FAILED):
            self._record_outcome(job_id, to, fields or {})
        return Transition(applied=code == 1, previous=_s(previous), batch_done=bool(done))

    def _transition_args(
        self,
        job_id: str,
        allowed_from: Iterable[JobState],
        to: JobState,
        fields: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
    ) -> list[Any]:
        now = time.time()
        args: list[Any] = [
            self.keys.prefix,
            job_id,
            batch_of(job_id),
            to.value,
            repr(now),
            self.status_ttl_s,
            repr(now + self.lease_s),
            owner or "",
        ]
        froms = [state.value for state in allowed_from]
        args += [len(froms), *froms]
        for name, value in (fields or {}).items():
            args += [name, json.dumps(value) if isinstance(value, dict | list) else value]
        return args

    def _record_outcome(self, job_id: str, to: JobState, fields: dict[str, Any]) -> None:
        """Count the outcome for /metrics and ETAs; best effort, the transition already stands."""
        timings = fields.get("timings") or {}
        render_s = sum(v for k, v in timings.items() if k != "batch_rows")
        le = next((str(b) for b in RENDER_BUCKETS_S if render_s <= b), "+Inf") if timings else ""
        reason = str(fields.get("reason") or failure_reason(str(fields.get("error", ""))))
        bucket = int(time.time() // THROUGHPUT_BUCKET_S)
        ttl = int(THROUGHPUT_KEEP_S + THROUGHPUT_BUCKET_S)
        try:
            args = [self.keys.prefix, job_id, to.value, bucket, ttl, le, render_s, reason]
            self._outcome(args=args)
        except redis.RedisError as e:
            log.warning("job %s: could not record its outcome for metrics: %s", job_id, e)

    def force(
        self,
        job_id: str,
        allowed_from: Iterable[JobState],
        to: JobState,
        fields: dict[str, Any] | None = None,
    ) -> Transition:
        """Like `transition`, but raise IllegalTransition when the change is refused."""
        result = self.transition(job_id, allowed_from, to, fields)
        if not result.applied:
            raise IllegalTransition(f"job {job_id}: {result.previous} -> {to.value} is not allowed")
        return result

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
            for job_id, (code, previous, _) in zip(ids, pipe.execute(), strict=True):
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
            args: list[Any] = [self.keys.prefix, batch_id, repr(time.time()), ttl, *ids]
            moved += int(self._retry(args=args))
        return moved

    def iter_jobs(self, batch_id: str) -> Iterator[list[dict[str, Any]]]:
        """The batch's job records in submit order, a slice at a time (for manifests)."""
        for ids in self._id_slices(batch_id):
            yield [record for record in self.jobs(ids) if record is not None]

    def job_states(self, job_ids: Sequence[str]) -> list[str | None]:
        """Only the states of many jobs, in one round trip (for filtered paging)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "state")
        return [None if v is None else _s(v) for v in pipe.execute()]

    def batches_page(self, offset: int, limit: int) -> list[dict[str, Any]]:
        """Batches newest first; forgets ids whose record expired."""
        ids = [_s(v) for v in self.redis.zrevrange(self.keys.batches(), offset, offset + limit - 1)]
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in ids:
            pipe.exists(self.keys.batch(batch_id))
        alive = [batch_id for batch_id, ok in zip(ids, pipe.execute(), strict=True) if ok]
        if len(alive) < len(ids):
            self.redis.zrem(self.keys.batches(), *(set(ids) - set(alive)))
        out = []
        for batch_id in alive:
            with contextlib.suppress(UnknownId):  # expired between the two reads
                out.append(self.batch(batch_id))
        return out

    def _id_slices(self, batch_id: str) -> Iterator[list[str]]:
        start = 0
        while ids := self.batch_job_ids(batch_id, start, start + _SUBMIT_SLICE - 1):
            yield ids
            start += len(ids)

    # -- dispatch and leases --------------------------------------------------------------------

    def pending_models(self) -> list[str]:
        return sorted(_s(m) for m in self.redis.smembers(self.keys.pending_models()))

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting in each model's pending lanes (cancelled ones count until skipped)."""
        return {
            model: pending_count(self.redis, self.keys, model) for model in self.pending_models()
        }

    def take(self, model: str, max_batch: int, *, wait_s: float = 0.0) -> Take:
        """Take the next chunk for `model` by the dispatch policy (`shared.pending`).

        A group of fewer than `max_batch` jobs is held until its oldest job has waited `wait_s`;
        the result then says when it is due instead.
        """
        return take_chunk(self._take_chunk, self.keys, model, max_batch, wait_s)

    def take_chunk(self, model: str, max_batch: int) -> Chunk | None:
        """Take up to `max_batch` compatible queued jobs for `model` now, holding nothing back."""
        return self.take(model, max_batch).chunk

    def renew_leases(
        self, worker: str, job_ids: Sequence[str], progress: tuple[int, int] | None = None
    ) -> set[str]:
        """Extend the leases `worker` holds, write progress; return ids with a cancel request."""
        if not job_ids:
            return set()
        until = repr(time.time() + self.lease_s)
        step, steps = progress if progress else ("", "")
        args = [self.keys.prefix, worker, until, step, steps, *job_ids]
        return {_s(v) for v in self._renew(args=args)}

    def expired_leases(self, now: float, limit: int = 1000) -> list[str]:
        return [_s(v) for v in self.redis.zrangebyscore(self.keys.leases(), "-inf", now, 0, limit)]

    def stale_inflight(self, older_than: float, limit: int = 1000) -> list[str]:
        return [
            _s(v)
            for v in self.redis.zrangebyscore(self.keys.inflight(), "-inf", older_than, 0, limit)
        ]


def failure_reason(error: str) -> str:
    """A short, bounded label for why a job failed (a Prometheus label must not be free text)."""
    text = error.lower()
    if "lease" in text:
        return "worker_lost"
    if "could not store" in text or "storage" in text:
        return "storage"
    if text.startswith("render failed"):
        return "render_failed"
    return "other"
