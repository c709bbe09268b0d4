"""Pending work: queued jobs waiting for the dispatcher, and the order it takes them in.

A queued job id sits in one *lane*: a list per (compat key, batch). Indexes over the lanes let
one Lua script (`lua/take_chunk.lua`) pick a chunk in O(tenants * SCAN + max_batch + log n):

- `tenant-turns:{model}`, a zset of the tenants with pending work for a model, scored by their
  *pass*: the jobs the dispatcher took of theirs, divided by their weight (stride scheduling).
  The tenant with the lowest pass goes next, so with equal weights tenants alternate, and
  with weights 3 and 1 one gets three jobs for the other's one. A tenant that joins (again)
  starts at the pass it left with, or at the *fair clock* (`fair-clock:{model}`, the pass of
  the tenant served last) when that is later; one kept behind banks one chunk at most.
- `batch-turns:{model}:{tenant}`, a zset of one tenant's batches with pending work for a model,
  scored `priority class * 2^40 + turn`. The class is `9 - priority`, so priority 9 sorts
  first; the turn is a global counter, renewed each time a batch is served, so batches of one
  class take turns (round robin) and a new batch joins at the back of its class. Across
  tenants priority comes first too: a tenant goes next only if no other has ready work of a
  more urgent class (`max_priority` limits who may ask for what).
- `batch-pending:{model}:{batch}`, a zset of the batch's compat keys by arrival: within a
  batch, the oldest group goes first.
- `pending:{compat}` (every tenant's) and `tenant-pending:{tenant}:{compat}` (one tenant's),
  zsets of the batches with jobs of one compat key: after the batch in turn has given its jobs,
  the chunk is filled with the same key's jobs of the tenant's other batches, then of other
  tenants' (each pays for its own jobs), so small submissions arriving together share one GPU
  pass and a tenant's thousand one-job batches make full chunks, each one turn of that tenant.

`pending-since` records when the oldest waiting job of each compat key arrived; a group with
fewer than `max_batch` jobs is held until `wait_s` after that, then sent as it is.

Submitting writes all of this in the same pipelined transaction as the batch record: a constant
number of commands per compat key, none per job beyond the list pushes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script

from shared.errors import InvalidJob
from shared.jobs import DEFAULT_PRIORITY, MAX_PRIORITY
from shared.keys import Keys
from shared.keys import text as _s

__all__ = [
    "PRIORITY_CLASS",
    "Chunk",
    "Take",
    "parse_priority",
    "pending_count",
    "queue_pending",
    "take_chunk",
    "turn_score",
]

PRIORITY_CLASS = 2**40  # turns per priority class; the Lua scripts use the same constant
_PUSH_SLICE = 2000  # ids per RPUSH while queueing a big batch
_SKIP_ROUNDS = 64  # calls spent skipping cancelled ids before giving the dispatcher back control


@dataclass(frozen=True)
class Chunk:
    """Jobs taken from the pending lanes to render together."""

    model: str
    compat: str
    job_ids: list[str]


@dataclass(frozen=True)
class Take:
    """One take: a chunk, or nothing; `hold_until` is when a group held for more jobs is due."""

    chunk: Chunk | None
    hold_until: float | None = None  # on the caller's clock (time.time())


def parse_priority(meta: Mapping[str, Any] | None) -> int:
    """The batch's priority from its record (0-9, 9 most urgent; DEFAULT_PRIORITY if absent)."""
    raw = (meta or {}).get("priority", DEFAULT_PRIORITY)
    try:
        value = int(raw)
    except (TypeError, ValueError) as e:
        raise InvalidJob(f"priority must be an integer from 0 to 9, got {raw!r}") from e
    if not 0 <= value <= MAX_PRIORITY:
        raise InvalidJob(f"priority must be from 0 to 9 (9 most urgent), got {value}")
    return value


def turn_score(priority: int, seq: int) -> int:
    """Where a batch sorts in its model's turn order: class first, then its turn."""
    return (MAX_PRIORITY - priority) * PRIORITY_CLASS + seq


def queue_pending(
    pipe: Pipeline,
    keys: Keys,
    batch_id: str,
    lanes: Mapping[str, tuple[str, list[str]]],
    *,
    priority: int,
    first_seq: int,
    now: str,
    tenant: str,
) -> None:
    """Add a batch's job ids to the pending lanes and indexes (`lanes`: compat -> model, ids).

    `first_seq` starts a run of `len(lanes)` numbers reserved from `Keys.sequence()`. The
    tenant joins each model's tenant turns in the commit script (`lua/commit_jobs.lua`).
    """
    for seq, (compat, (model, ids)) in enumerate(lanes.items(), start=first_seq):
        for start in range(0, len(ids), _PUSH_SLICE):
            pipe.rpush(keys.pending_jobs(compat, batch_id), *ids[start : start + _PUSH_SLICE])
        pipe.zadd(keys.batch_pending(model, batch_id), {compat: seq}, nx=True)
        pipe.zadd(keys.pending(compat), {batch_id: seq}, nx=True)
        pipe.zadd(keys.tenant_pending(tenant, compat), {batch_id: seq}, nx=True)
        pipe.hsetnx(keys.pending_since(), compat, now)
        # NX: a batch with several compat keys keeps the turn its first one gave it.
        turns = keys.batch_turns(model, tenant)
        pipe.zadd(turns, {batch_id: turn_score(priority, seq)}, nx=True)
        pipe.sadd(keys.pending_models(), model)


def take_chunk(
    script: Script,
    keys: Keys,
    model: str,
    max_batch: int,
    wait_s: float,
    *,
    weights: Mapping[str, float] | None = None,
) -> Take:
    """Run TAKE_CHUNK; go on while it only skipped cancelled ids, so they never stall a model.

    `weights`: each tenant's share weight (a tenant not named weighs 1)."""
    args: list[Any] = [keys.prefix, model, max_batch, wait_s]
    for tenant, weight in sorted((weights or {}).items()):
        args += [tenant, repr(float(weight))]
    for _ in range(_SKIP_ROUNDS):
        out = script(args=args)
        compat, due_in, skipped = _s(out[0]), _s(out[1]), int(out[2])
        ids = [_s(v) for v in out[3:]]
        if ids:
            return Take(Chunk(model=model, compat=compat, job_ids=ids))
        if not skipped:
            # The script waits by Redis's clock and says how long is left: due on this host's
            # clock is now plus that, whatever the two clocks read.
            return Take(None, time.time() + float(due_in) if due_in else None)
    return Take(None)


def pending_count(client: redis.Redis, keys: Keys, model: str) -> int:
    """Jobs waiting in `model`'s lanes, in four round trips whatever their number.

    Cancelled ids not yet skipped by a take still count, so this can run a little high.
    """
    tenants = [_s(t) for t in client.zrange(keys.tenant_turns(model), 0, -1)]
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.turns(model), 0, -1)  # a farm's from before tenants, until moved
    for tenant in tenants:
        pipe.zrange(keys.batch_turns(model, tenant), 0, -1)
    batches = sorted({_s(b) for found in pipe.execute() for b in found})
    if not batches:
        return 0
    pipe = client.pipeline(transaction=False)
    for batch_id in batches:
        pipe.zrange(keys.batch_pending(model, batch_id), 0, -1)
    lanes = [
        keys.pending_jobs(_s(compat), batch_id)
        for batch_id, compats in zip(batches, pipe.execute(), strict=True)
        for compat in compats
    ]
    pipe = client.pipeline(transaction=False)
    for lane in lanes:
        pipe.llen(lane)
    return sum(int(n) for n in pipe.execute())
