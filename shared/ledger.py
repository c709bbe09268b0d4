"""The job ledger in Redis: the system of record for every job and batch.

Every state change goes through one Lua compare-and-set (`shared.lua.TRANSITION`) that also moves
the batch counters, so `queued + running + succeeded + failed + cancelled == total` at every
instant. Terminal states are final. Job and batch records expire `status_ttl_s` after their last
write; the pending lists, the in-flight set and the leases never expire.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from shared.errors import IllegalTransition, UnknownId
from shared.jobs import TERMINAL_STATES, JobSpec, JobState, batch_of, compat_key, job_id_for
from shared.keys import Keys
from shared.lua import RENEW_LEASES, TAKE_CHUNK, TRANSITION

__all__ = ["Chunk", "Ledger", "Transition"]

log = logging.getLogger(__name__)

STATES = [state.value for state in JobState]
_SUBMIT_SLICE = 2000  # jobs per pipeline round trip while writing a big batch


@dataclass(frozen=True)
class Transition:
    """What a compare-and-set did: `applied`, the state it found, and whether the batch ended."""

    applied: bool
    previous: str
    batch_done: bool


@dataclass(frozen=True)
class Chunk:
    """Jobs taken from the pending lists to render together."""

    model: str
    compat: str
    job_ids: list[str]


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
        job_ids = [job_id_for(batch_id, i) for i in range(len(specs))]
        by_compat: dict[str, list[str]] = {}
        models: dict[str, str] = {}
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
                pipe.hset(
                    key,
                    mapping={
                        "state": JobState.QUEUED.value,
                        "batch_id": batch_id,
                        "spec": spec.model_dump_json(),
                        "model": spec.model,
                        "compat": compat,
                        "seed": spec.seed,
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                    },
                )
                pipe.expire(key, ttl)
            pipe.execute()
        # Pending keys are ordered by first arrival; ZADD NX keeps an older key's place.
        last_seq = self.redis.incrby(self.keys.sequence(), len(by_compat))
        pipe = self.redis.pipeline(transaction=True)
        batch_key = self.keys.batch(batch_id)
        record: dict[Any, Any] = {"total": len(specs), "created_at": now, **(meta or {})}
        record |= {state: 0 for state in STATES} | {JobState.QUEUED.value: len(specs)}
        pipe.hset(batch_key, mapping=record)
        pipe.expire(batch_key, ttl)
        for start in range(0, len(job_ids), _SUBMIT_SLICE):
            pipe.rpush(self.keys.batch_jobs(batch_id), *job_ids[start : start + _SUBMIT_SLICE])
        pipe.expire(self.keys.batch_jobs(batch_id), ttl)
        pipe.zadd(self.keys.batches(), {batch_id: float(now)})
        for seq, (compat, ids) in enumerate(by_compat.items(), start=last_seq - len(by_compat) + 1):
            for start in range(0, len(ids), _SUBMIT_SLICE):
                pipe.rpush(self.keys.pending(compat), *ids[start : start + _SUBMIT_SLICE])
            pipe.zadd(self.keys.pending_index(models[compat]), {compat: seq}, nx=True)
            pipe.sadd(self.keys.pending_models(), models[compat])
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
        for name in ("spec", "result", "timings"):
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
    ) -> Transition:
        """Move a job to `to` if it is in one of `allowed_from`; raise UnknownId if it is gone."""
        now = time.time()
        args: list[Any] = [
            self.keys.prefix,
            job_id,
            batch_of(job_id),
            to.value,
            repr(now),
            self.status_ttl_s,
            repr(now + self.lease_s),
        ]
        froms = [state.value for state in allowed_from]
        args += [len(froms), *froms]
        for name, value in (fields or {}).items():
            args += [name, json.dumps(value) if isinstance(value, dict | list) else value]
        code, previous, done = self._transition(args=args)
        if code == -1:
            raise UnknownId(f"no job {job_id!r}")
        return Transition(applied=code == 1, previous=_s(previous), batch_done=bool(done))

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

    # -- dispatch and leases --------------------------------------------------------------------

    def pending_models(self) -> list[str]:
        return sorted(_s(m) for m in self.redis.smembers(self.keys.pending_models()))

    def take_chunk(self, model: str, max_batch: int) -> Chunk | None:
        """Take up to `max_batch` compatible queued jobs for `model`, oldest first."""
        out = self._take_chunk(args=[self.keys.prefix, model, max_batch, repr(time.time())])
        compat, ids = _s(out[0]), [_s(v) for v in out[1:]]
        if not ids:
            return None
        return Chunk(model=model, compat=compat, job_ids=ids)

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

    def is_terminal(self, state: str) -> bool:
        return state in {s.value for s in TERMINAL_STATES}


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
