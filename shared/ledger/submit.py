"""Writing a new batch: its jobs, its record and its pending lanes, in as few round trips as a
100,000-job batch allows, and all of it or none of it.

`plan_batch` encodes the jobs and estimates what they will take in Redis (`shared.ledger.budget`)
before anything is written, so a batch the ledger cannot afford is refused for free. Then
`write_batch` writes the jobs in pipelined slices, each record with a short TTL
(`uncommitted_ttl_s`); the batch record, the batch lists, the pending lanes and the jobs' full
TTL (`lua/commit_jobs.lua`) follow in one transaction. A batch is never visible without being
pending, and a write that fails half way deletes the records it wrote; a submit killed half way
leaves records nothing points at, which expire on their short TTL.

The same transaction adds the batch's jobs to its tenant's count of jobs not yet final
(`Keys.tenant_open`; TRANSITION takes each one off at its first final state). With `max_open`
(the tenant's `max_queued_jobs`) the count is WATCHed, checked and raised in that transaction,
so two submits can never pass the limit together.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script

from shared.errors import LedgerFull, RateLimited
from shared.ids import job_id_for
from shared.jobs import JobSpec, JobState
from shared.keys import Keys
from shared.ledger.budget import estimate_bytes
from shared.ledger.pending import parse_priority, queue_pending
from shared.ledger.records import DEFAULT_TENANT, STATES
from shared.routing import compat_key, route_of

__all__ = [
    "QUEUE_FULL_RETRY_S",
    "UNCOMMITTED_TTL_S",
    "BatchPlan",
    "check_open",
    "plan_batch",
    "write_batch",
]

log = logging.getLogger(__name__)

_SUBMIT_SLICE = 2000  # jobs per pipeline round trip while writing a big batch
_WATCH_TRIES = 20  # commits tried while other writes move the tenant's open count meanwhile
QUEUE_FULL_RETRY_S = 30  # Retry-After of a submit over max_queued_jobs: some jobs end by then
UNCOMMITTED_TTL_S = 600  # a job record's TTL until its batch is committed


@dataclass(frozen=True)
class BatchPlan:
    """A batch encoded for the ledger: its job ids, each job's (spec JSON, route, compat key,
    seed), and the bytes it will take in Redis."""

    batch_id: str
    job_ids: list[str]
    rows: list[tuple[str, str, str, int]]
    estimate_bytes: int


def plan_batch(
    batch_id: str, specs: Sequence[JobSpec], meta: Mapping[str, str] | None
) -> BatchPlan:
    """Encode the jobs once (the estimate and the write use the same text)."""
    job_ids = [job_id_for(batch_id, i) for i in range(len(specs))]
    rows: list[tuple[str, str, str, int]] = []
    text = 0
    for job_id, spec in zip(job_ids, specs, strict=True):
        assert spec.model is not None and spec.seed is not None
        encoded = spec.model_dump_json()
        row = (encoded, route_of(spec), compat_key(spec), spec.seed)
        # A str's length is its bytes when ASCII (an O(1) test); else count the UTF-8 Redis holds.
        text += len(encoded) if encoded.isascii() else len(encoded.encode())
        text += len(row[1]) + len(row[2]) + 2 * len(job_id)
        rows.append(row)
    lanes = len({row[2] for row in rows})
    return BatchPlan(batch_id, job_ids, rows, estimate_bytes(text, len(rows), lanes, meta))


def write_batch(
    client: redis.Redis,
    keys: Keys,
    plan: BatchPlan,
    *,
    meta: Mapping[str, str] | None,
    now: str,
    ttl_s: int,
    uncommitted_ttl_s: int,
    commit_jobs: Script,
    wake: Callable[[Pipeline], None],
    tenant: str = DEFAULT_TENANT,
    max_open: int | None = None,
) -> list[str]:
    """Write the batch as the module says; `now` is its arrival time (Redis's clock). The
    batch records `tenant` and joins that tenant's index in the same transaction. On a Redis
    error nothing of the batch is kept: LedgerFull when Redis is out of memory, else the error.
    RateLimited (nothing kept) when the tenant's jobs not yet final would pass `max_open`."""
    batch_id, job_ids = plan.batch_id, plan.job_ids
    priority = parse_priority(meta)  # InvalidJob before anything is written
    tried = 0  # job records that may have been written
    committing = False
    try:
        for start in range(0, len(job_ids), _SUBMIT_SLICE):
            tried = start + _SUBMIT_SLICE
            _write_jobs(client, keys, plan, start, tried, now=now, ttl=uncommitted_ttl_s)
        committing = True
        _commit(
            client,
            keys,
            plan,
            meta=meta,
            priority=priority,
            now=now,
            ttl=ttl_s,
            commit_jobs=commit_jobs,
            wake=wake,
            tenant=tenant,
            max_open=max_open,
        )
    except RateLimited:
        _forget_jobs(client, keys, job_ids[:tried], batch_id)
        raise
    except redis.RedisError as e:
        committed = _committed(client, keys, batch_id) if committing else False
        if committed:
            log.warning("batch %s: committed, but its answer was lost (%s)", batch_id, e)
            return job_ids
        if committed is False:  # None: unknown, so the records are left to their TTL
            _forget_jobs(client, keys, job_ids[:tried], batch_id)
        if isinstance(e, redis.exceptions.OutOfMemoryError) or "OOM" in str(e):
            raise LedgerFull(
                f"Redis ran out of memory while writing batch {batch_id} ({len(job_ids)} jobs) "
                "and nothing of it was kept; give Redis more memory, or lower "
                f"SDFARM_LEDGER_MAX_BYTES so that such batches are refused first ({e})"
            ) from e
        raise
    return job_ids


def _write_jobs(
    client: redis.Redis, keys: Keys, plan: BatchPlan, start: int, stop: int, *, now: str, ttl: int
) -> None:
    pipe = client.pipeline(transaction=False)
    queued, batch_id = JobState.QUEUED.value, plan.batch_id
    for job_id, (spec, route, compat, seed) in zip(
        plan.job_ids[start:stop], plan.rows[start:stop], strict=True
    ):
        key = keys.job(job_id)
        # HSET spelled out: `hset(mapping=...)` rebuilds these arguments for every job,
        # which was a fifth of the time to accept a big batch. (redis-py leaves
        # execute_command untyped.) A job's `model` field is its route (shared/jobs.py).
        pipe.execute_command(  # type: ignore[no-untyped-call]
            "HSET", key, "state", queued, "batch_id", batch_id,
            "spec", spec, "model", route, "compat", compat,
            "seed", seed, "attempts", 0, "created_at", now, "updated_at", now,
        )  # fmt: skip
        pipe.execute_command("EXPIRE", key, ttl)  # type: ignore[no-untyped-call]
    pipe.execute()


def _commit(
    client: redis.Redis,
    keys: Keys,
    plan: BatchPlan,
    *,
    meta: Mapping[str, str] | None,
    priority: int,
    now: str,
    ttl: int,
    commit_jobs: Script,
    wake: Callable[[Pipeline], None],
    tenant: str,
    max_open: int | None,
) -> None:
    batch_id, job_ids, total = plan.batch_id, plan.job_ids, len(plan.job_ids)
    by_compat: dict[str, list[str]] = {}
    models: dict[str, str] = {}
    for job_id, (_, route, compat, _) in zip(job_ids, plan.rows, strict=True):
        by_compat.setdefault(compat, []).append(job_id)
        models[compat] = route
    # One arrival number per compat key: it orders the batch's groups and gives its turn.
    last_seq = client.incrby(keys.sequence(), len(by_compat))
    first_seq = last_seq - len(by_compat) + 1
    lanes = {compat: (models[compat], ids) for compat, ids in by_compat.items()}
    open_key = keys.tenant_open(tenant)
    with client.pipeline(transaction=True) as pipe:
        for _ in range(_WATCH_TRIES):
            try:
                if max_open is not None:
                    pipe.watch(open_key)  # type: ignore[no-untyped-call]
                    check_open(tenant, int(pipe.get(open_key) or 0), total, max_open)
                    pipe.multi()
                _queue_commit(
                    pipe, keys, plan,
                    meta=meta, priority=priority, now=now, ttl=ttl, commit_jobs=commit_jobs,
                    tenant=tenant,
                )  # fmt: skip
                queue_pending(
                    pipe, keys, batch_id, lanes,
                    priority=priority, first_seq=first_seq, now=now, tenant=tenant,
                )  # fmt: skip
                wake(pipe)
                pipe.execute()
                return
            except redis.WatchError:
                continue  # a job of the tenant's ended (or a batch came) meanwhile: look again
    raise RateLimited(
        f"tenant {tenant!r} has jobs ending and starting too fast to count its queued jobs "
        "now; try again in a second",
        1,
    )


def check_open(tenant: str, open_now: int, total: int, max_open: int) -> None:
    """Refuse a batch that would take the tenant's jobs not yet final past `max_open`."""
    if open_now + total <= max_open:
        return
    raise RateLimited(
        f"tenant {tenant!r} may have at most {max_open} jobs queued or running (its "
        f"max_queued_jobs is {max_open}); it has {open_now} and this batch adds {total}: try "
        f"again when it has {max_open - total} or fewer, or send a smaller batch",
        QUEUE_FULL_RETRY_S,
    )


def _queue_commit(
    pipe: Pipeline,
    keys: Keys,
    plan: BatchPlan,
    *,
    meta: Mapping[str, str] | None,
    priority: int,
    now: str,
    ttl: int,
    commit_jobs: Script,
    tenant: str,
) -> None:
    """The commit's commands, queued on `pipe` (the transaction), pending lanes aside."""
    batch_id, job_ids, total = plan.batch_id, plan.job_ids, len(plan.job_ids)
    batch_key = keys.batch(batch_id)
    routes = sorted({row[1] for row in plan.rows})
    record: dict[Any, Any] = {"total": total, "created_at": now, **(meta or {})}
    record |= {"priority": priority, "models": ",".join(routes)}
    record |= {state: 0 for state in STATES} | {JobState.QUEUED.value: total}
    record["tenant"] = tenant  # after meta: a batch's tenant is the caller's, never an option
    record["open_counted"] = 1  # in the tenant's open count: TRANSITION takes its jobs off
    pipe.hset(batch_key, mapping=record)
    pipe.expire(batch_key, ttl)
    for start in range(0, total, _SUBMIT_SLICE):
        pipe.rpush(keys.batch_jobs(batch_id), *job_ids[start : start + _SUBMIT_SLICE])
    pipe.expire(keys.batch_jobs(batch_id), ttl)
    # the jobs' full TTL, and the tenant's turn for each model
    commit_jobs(args=[keys.prefix, batch_id, ttl, tenant, *routes], client=pipe)
    pipe.incrby(keys.tenant_open(tenant), total)
    pipe.zadd(keys.batches(), {batch_id: float(now)})
    pipe.zadd(keys.tenant_batches(tenant), {batch_id: float(now)})  # its own list, same rules
    pipe.hincrby(keys.stats("submitted"), tenant, total)  # jobs submitted, for /metrics
    pipe.zadd(keys.active_batches(), {batch_id: float(now)})  # unfinished, for ETAs


def _committed(client: redis.Redis, keys: Keys, batch_id: str) -> bool | None:
    """Whether the commit applied (its answer may be what was lost); None when unknown."""
    try:
        return bool(client.exists(keys.batch(batch_id)))
    except redis.RedisError:
        return None


def _forget_jobs(client: redis.Redis, keys: Keys, job_ids: Sequence[str], batch_id: str) -> None:
    """Delete the records of a batch that was not committed (DEL works on a full Redis); if
    Redis cannot be reached, they expire on their short TTL."""
    with contextlib.suppress(redis.RedisError):
        for start in range(0, len(job_ids), _SUBMIT_SLICE):
            client.delete(*(keys.job(j) for j in job_ids[start : start + _SUBMIT_SLICE]))
        log.info("batch %s: not written; its %d job records deleted", batch_id, len(job_ids))
        return
    log.warning("batch %s: not written; its job records expire on their own", batch_id)
