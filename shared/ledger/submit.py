"""Writing a new batch: its jobs, its record and its pending lanes, in as few round trips as a
100,000-job batch allows.

Jobs are written first, in pipelined slices; the batch record, the batch lists (all batches,
the tenant's batches, active batches) and the pending lanes follow in one transaction, so a
crash half way leaves only invisible job records that expire, and a batch is never visible
without being pending.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis
from redis.client import Pipeline

from shared.ids import job_id_for
from shared.jobs import JobSpec, JobState
from shared.keys import Keys
from shared.ledger.pending import parse_priority, queue_pending
from shared.ledger.records import DEFAULT_TENANT, STATES
from shared.routing import compat_key, route_of

__all__ = ["write_batch"]

_SUBMIT_SLICE = 2000  # jobs per pipeline round trip while writing a big batch


def write_batch(
    client: redis.Redis,
    keys: Keys,
    batch_id: str,
    specs: Sequence[JobSpec],
    *,
    meta: Mapping[str, str] | None,
    now: str,
    ttl_s: int,
    wake: Callable[[Pipeline], None],
    tenant: str = DEFAULT_TENANT,
) -> list[str]:
    """Write the batch as the module says; `now` is its arrival time (Redis's clock). The
    batch records `tenant` and joins that tenant's index in the same transaction."""
    ttl = ttl_s
    priority = parse_priority(meta)
    job_ids = [job_id_for(batch_id, i) for i in range(len(specs))]
    by_compat: dict[str, list[str]] = {}
    models: dict[str, str] = {}
    queued = JobState.QUEUED.value
    for start in range(0, len(specs), _SUBMIT_SLICE):
        pipe = client.pipeline(transaction=False)
        for job_id, spec in zip(
            job_ids[start : start + _SUBMIT_SLICE],
            specs[start : start + _SUBMIT_SLICE],
            strict=True,
        ):
            compat = compat_key(spec)
            assert spec.model is not None and spec.seed is not None
            by_compat.setdefault(compat, []).append(job_id)
            # A job's `model` field is its route: its model, or `base+refiner` (shared/jobs.py).
            models[compat] = route = route_of(spec)
            key = keys.job(job_id)
            # HSET spelled out: `hset(mapping=...)` rebuilds these arguments for every job,
            # which was a fifth of the time to accept a big batch. (redis-py leaves
            # execute_command untyped.)
            pipe.execute_command(  # type: ignore[no-untyped-call]
                "HSET", key, "state", queued, "batch_id", batch_id,
                "spec", spec.model_dump_json(), "model", route, "compat", compat,
                "seed", spec.seed, "attempts", 0, "created_at", now, "updated_at", now,
            )  # fmt: skip
            pipe.execute_command("EXPIRE", key, ttl)  # type: ignore[no-untyped-call]
        pipe.execute()
    # One arrival number per compat key: it orders the batch's groups and gives its turn.
    last_seq = client.incrby(keys.sequence(), len(by_compat))
    pipe = client.pipeline(transaction=True)
    batch_key = keys.batch(batch_id)
    record: dict[Any, Any] = {"total": len(specs), "created_at": now, **(meta or {})}
    record |= {"priority": priority, "models": ",".join(sorted(set(models.values())))}
    record |= {state: 0 for state in STATES} | {JobState.QUEUED.value: len(specs)}
    record["tenant"] = tenant  # after meta: a batch's tenant is the caller's, never an option
    pipe.hset(batch_key, mapping=record)
    pipe.expire(batch_key, ttl)
    for start in range(0, len(job_ids), _SUBMIT_SLICE):
        pipe.rpush(keys.batch_jobs(batch_id), *job_ids[start : start + _SUBMIT_SLICE])
    pipe.expire(keys.batch_jobs(batch_id), ttl)
    pipe.zadd(keys.batches(), {batch_id: float(now)})
    pipe.zadd(keys.tenant_batches(tenant), {batch_id: float(now)})  # its own list, same rules
    pipe.hincrby(keys.stats("submitted"), tenant, len(specs))  # jobs submitted, for /metrics
    pipe.zadd(keys.active_batches(), {batch_id: float(now)})  # unfinished, for ETAs
    lanes = {compat: (models[compat], ids) for compat, ids in by_compat.items()}
    first_seq = last_seq - len(by_compat) + 1
    queue_pending(pipe, keys, batch_id, lanes, priority=priority, first_seq=first_seq, now=now)
    wake(pipe)
    pipe.execute()
    return job_ids
