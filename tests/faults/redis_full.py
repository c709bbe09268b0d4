"""Scenario 15: Redis fills up (noeviction) while a big batch is submitted and a normal one renders.

Redis is given `maxmemory` with room for about half of a big batch, twice:

1. The API reads Redis's `maxmemory` (`shared.ledger.budget`) and refuses half the batch (it
   fits the budget, not the room left) before a byte is written: a 507 naming the budget.
2. The API's last look at Redis's memory (kept for a second) still says "no limit" when the big
   batch arrives, so its estimate passes and its writes start; Redis answers OOM part way
   through, and `write_batch` deletes the records it wrote: a 507 saying Redis ran out of memory.

Neither leaves a job record or a batch behind; the batch rendering meanwhile ends whole, and once
`maxmemory` is restored a new batch is accepted and renders.
"""

from __future__ import annotations

import time
from typing import Any

from shared.errors import InvalidJob, LedgerFull
from shared.ids import new_batch_id
from shared.jobs import JobSpec
from tests.faults.harness import MODEL, TINY, FaultFarm, Row
from tests.faults.infra import BRISK

BIG_PER_JOB = 100  # the big batch has this many jobs per job of the scenario's size
BUDGET_FRESH_S = 1.2  # past shared/ledger/budget.py's _FRESH_S: the API reads INFO memory again
MID_WRITE_TRIES = 3  # a busy machine may take longer than the API's second to parse the batch


def redis_full_mid_submit(ff: FaultFarm) -> Row:
    """15. Redis full mid-submit: refused by the budget, then OOM mid-write; nothing kept."""
    batch_id, _ = ff.submit(3 * ff.size.jobs, BRISK, tag="full")
    ff.wait_until(lambda: ff.ledger.batch(batch_id)["counts"]["running"], "the batch to render")
    prompts = [f"redis full, big batch prompt {i}" for i in range(BIG_PER_JOB * ff.size.jobs)]
    room = _estimate(ff, prompts) // 2
    original = int(ff.redis.config_get("maxmemory").get("maxmemory") or 0)
    probes: list[str] = []
    try:
        counted = _counts(ff)
        _set_room(ff, room)
        time.sleep(BUDGET_FRESH_S)
        # Half the batch: within the budget (Redis's maxmemory less 10 %), not within its room.
        budget = _refused(ff, prompts[: len(prompts) // 2], counted)
        mid_write: dict[str, Any] = {"tries": 0}
        while mid_write["tries"] < MID_WRITE_TRIES and not mid_write.get("oom"):
            mid_write = _fill_mid_write(ff, prompts, room, original, probes) | {
                "tries": mid_write["tries"] + 1
            }
        during = ff.ledger.batch(batch_id)["counts"]
    finally:
        ff.redis.config_set("maxmemory", original)
    after_id, _ = ff.submit(4, TINY, tag="after-full")
    for done in [batch_id, *probes, after_id]:
        ff.wait_done(done)
    row = ff.tally(
        f"Redis full mid-submit ({len(prompts)} jobs, {room / 1e6:.1f} MB of room)",
        [batch_id, *probes, after_id],
        None,
        notes=f"budget: {budget['status']}, job keys {budget['keys']}; mid-write: "
        f"{mid_write['status']} (Redis OOM: {mid_write['oom']}, try {mid_write['tries']}), "
        f"{mid_write['oom_replies']} OOM replies, job keys {mid_write['keys']}; the rendering "
        f"batch {during['succeeded']}/{sum(during.values())} done then; a batch after: "
        f"{ff.ledger.batch(after_id)['counts']['succeeded']}/4 succeeded",
    )
    row.details |= {"budget": budget, "mid_write": mid_write, "during": during}
    for part in (budget, mid_write):
        if part["left"] or part["batches_left"]:
            raise AssertionError(f"a refused submit left records behind: {row.notes}")
    if budget["oom"] or budget["oom_replies"]:
        raise AssertionError(f"the budget let through a batch Redis cannot hold: {row.notes}")
    if not mid_write["oom"] or not mid_write["oom_replies"]:
        raise AssertionError(f"Redis never ran out of memory mid-write: {row.notes}")
    return row


def _estimate(ff: FaultFarm, prompts: list[str]) -> int:
    specs = [
        JobSpec.model_validate(TINY | {"model": MODEL, "seed": i, "prompt": p})
        for i, p in enumerate(prompts)
    ]
    return ff.ledger.plan_batch(new_batch_id(), specs).estimate_bytes


def _set_room(ff: FaultFarm, room: int) -> None:
    """`maxmemory` this much above what Redis holds now."""
    ff.redis.config_set("maxmemory", int(ff.redis.info("memory")["used_memory"]) + room)


def _job_keys(ff: FaultFarm) -> int:
    return sum(1 for _ in ff.redis.scan_iter(match=ff.keys.job("*"), count=1000))


def _oom_replies(ff: FaultFarm) -> int:
    """Commands Redis has refused for memory so far (INFO errorstats)."""
    return int(ff.redis.info("errorstats").get("errorstat_OOM", {}).get("count", 0))


def _counts(ff: FaultFarm) -> tuple[int, int]:
    """Job records and batches in the ledger now."""
    return _job_keys(ff), int(ff.redis.zcard(ff.keys.batches()))


def _refused(ff: FaultFarm, prompts: list[str], counted: tuple[int, int]) -> dict[str, Any]:
    """Submit the big batch, which must be refused; what it left behind (`counted` before)."""
    keys, batches = counted
    oom_replies = _oom_replies(ff)
    try:
        ff.submit_prompts(prompts, TINY)
    except (LedgerFull, InvalidJob) as e:  # 507, or 413 when over the whole budget
        status = f"{507 if isinstance(e, LedgerFull) else 413} ({str(e)[:50]}...)"
        oom = "ran out of memory" in str(e)
    else:
        raise AssertionError(f"a batch of {len(prompts)} jobs was accepted on a full Redis")
    keys_after, batches_after = _counts(ff)
    return {
        "status": status,
        "oom": oom,
        "oom_replies": _oom_replies(ff) - oom_replies,
        "keys": f"{keys}->{keys_after}",
        "left": keys_after - keys,
        "batches_left": batches_after - batches,
    }


def _fill_mid_write(
    ff: FaultFarm, prompts: list[str], room: int, original: int, probes: list[str]
) -> dict[str, Any]:
    """With no limit, let the API read Redis's memory (a one-job probe batch), then give Redis
    `room` and submit the big batch within the second the API trusts that reading."""
    ff.redis.config_set("maxmemory", original)
    time.sleep(BUDGET_FRESH_S)
    keys, batches = _counts(ff)
    probes.append(ff.submit(1, TINY, tag=f"probe {len(probes)}")[0])
    _set_room(ff, room)
    return _refused(ff, prompts, (keys + 1, batches + 1))  # the probe's job and batch
