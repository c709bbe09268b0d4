"""Step 1 of a chunk: claim its jobs in the ledger.

1. Read every job of the message in one round trip.
2. Skip the jobs that are not `queued` (a duplicate delivery, a cancel, a job another worker took)
   and the ones for a model this worker does not hold (sent here by mistake: left for the
   reconciler to send where the model is).
3. Read each job's spec. A spec that no longer validates fails that job alone, at once, with the
   reason: it is not worth an attempt, and it must not take its chunk neighbours with it.
4. Move the rest to `running` with a lease held by this worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic

from shared.errors import FailureReason
from shared.jobs import JobSpec, JobState
from shared.ledger import Ledger
from shared.problems import problems_from, summary
from shared.routing import route_of

__all__ = ["Claim", "Claimed", "claim_jobs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    """A job this worker now holds: its id and its validated spec."""

    job_id: str
    spec: JobSpec


@dataclass
class Claim:
    """What claiming a chunk did."""

    jobs: list[Claimed] = field(default_factory=list)  # now `running`, held by this worker
    skipped: list[str] = field(default_factory=list)  # not queued here: left alone
    failed: list[str] = field(default_factory=list)  # their spec cannot be read: failed now


def claim_jobs(
    ledger: Ledger, worker_id: str, job_ids: Sequence[str], model_name: str, *, holds_model: bool
) -> Claim:
    """Claim the chunk's jobs that are queued for `model_name` (a model, or `base+refiner`: the
    job's route, shared/jobs.py); see the module's steps."""
    claim = Claim()
    for job_id, record in zip(job_ids, ledger.jobs(job_ids), strict=True):
        # 2. Only queued jobs of a model this worker holds.
        if record is None or record.state is not JobState.QUEUED or not holds_model:
            claim.skipped.append(job_id)
            continue
        # 3. A spec that no longer validates fails alone.
        try:
            spec = record.spec
        except pydantic.ValidationError as e:
            _fail_unreadable(ledger, job_id, summary(problems_from(e.errors())), claim)
            continue
        if route_of(spec) != model_name:
            claim.skipped.append(job_id)
            continue
        # 4. Running, with a lease.
        fields = {"worker": worker_id, "started_at": time.time(), "step": 0, "steps": spec.steps}
        if ledger.transition(job_id, [JobState.QUEUED], JobState.RUNNING, fields).applied:
            claim.jobs.append(Claimed(job_id, spec))
        else:
            claim.skipped.append(job_id)
    if claim.skipped:
        log.info("chunk %s: skipped %d jobs not queued here", job_ids[0], len(claim.skipped))
    return claim


def _fail_unreadable(ledger: Ledger, job_id: str, problem: str, claim: Claim) -> None:
    error = f"its stored spec cannot be rendered: {problem}"
    fields: dict[str, Any] = {"error": error, "reason": FailureReason.INVALID_INPUT.value}
    fields["finished_at"] = time.time()
    if ledger.transition(job_id, [JobState.QUEUED], JobState.FAILED, fields).applied:
        log.warning("job %s: failed: %s", job_id, error)
        claim.failed.append(job_id)
    else:
        claim.skipped.append(job_id)
