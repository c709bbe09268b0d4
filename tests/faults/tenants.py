"""Scenario 12: a hostile tenant beside a normal one, on the real farm (dispatcher and workers).

The hostile tenant splits its work into one-job batches; the normal tenant sends one batch of as
many jobs. Both are written straight to the farm's ledger, as `submit` writes an accepted batch
(the local farm has one API key, so one tenant, behind its API), hostile's first. The measured
thing is the order the workers started the jobs in once both were written, while both had work:
the longest run of one tenant's jobs, and hostile's share.
"""

from __future__ import annotations

import itertools
import time

from shared.ids import new_batch_id
from shared.jobs import JobSpec
from tests.faults.harness import MODEL, TINY, FaultFarm, Row

SHARE_BAND = (0.35, 0.65)  # hostile's share of the jobs started while both had work


def hostile_tenant(ff: FaultFarm) -> Row:
    """12. A hostile tenant of one-job batches beside a normal one: each gets half the GPUs."""
    n = ff.size.soak_jobs
    hostile = [_write(ff, "hostile", 1, i) for i in range(n)]
    normal = _write(ff, "normal", n, 0)
    written_at = time.time()
    for batch_id in [*hostile, normal]:
        ff.wait_done(batch_id)
    owner = {batch_id: "hostile" for batch_id in hostile} | {normal: "normal"}
    started = []
    for batch_id in [*hostile, normal]:
        for record in ff.jobs(ff.ledger.batch_job_ids(batch_id)):
            if float(record.get("started_at") or 0) >= written_at:
                started.append((float(record["started_at"]), owner[batch_id]))
    order = [who for _, who in sorted(started)]
    # While both had work: up to the last start of the tenant that ran out first (hostile's
    # first jobs started while its batches were being written, so it runs out first).
    both = order[: min(len(order) - order[::-1].index(who) for who in set(order))]
    run_owner, run = max(
        ((who, len(list(group))) for who, group in itertools.groupby(both)),
        key=lambda r: r[1],
        default=("-", 0),
    )
    share = both.count("hostile") / max(1, len(both))
    row = ff.tally(
        f"hostile tenant ({n} one-job batches) beside a normal one ({n} jobs)",
        [*hostile, normal],
        None,
        notes=f"{len(both)} jobs started while both had work: longest run {run} jobs "
        f"({run_owner}), hostile's share {share:.0%}",
    )
    row.details |= {"order": order, "longest_run": run, "hostile_share": share}
    low, high = SHARE_BAND
    if not low <= share <= high:
        raise AssertionError(f"unfair: {row.notes} (expected {low:.0%}-{high:.0%})")
    return row


def _write(ff: FaultFarm, tenant: str, jobs: int, seed: int) -> str:
    batch_id = new_batch_id()
    specs = [
        JobSpec.model_validate(
            TINY
            | {"model": MODEL, "seed": seed + i, "prompt": f"{tenant} tenant, a lighthouse {i}"}
        )
        for i in range(jobs)
    ]
    ff.ledger.create_batch(batch_id, specs, tenant=tenant)
    return batch_id
