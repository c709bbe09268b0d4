"""Job state changes, a part of `Ledger` kept in a file of its own: one Lua compare-and-set each
(`scripts.TRANSITION`), which also moves the batch counters, and the one policy for an attempt
that ended without an image (`requeue_or_fail`), which the reconciler and the workers share.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.commands.core import Script

from shared.errors import FailureReason, IllegalTransition
from shared.ids import batch_of
from shared.jobs import JobState
from shared.keys import Keys
from shared.keys import text as _s
from shared.ledger.outcomes import Outcomes
from shared.ledger.records import JobRecord, unknown_job

__all__ = ["Transition", "Transitions"]


@dataclass(frozen=True)
class Transition:
    """What a compare-and-set did: `applied`, the state it found, whether the batch ended, and
    the state the job is in now (a hand-back of a job whose cancel was requested ends it
    `cancelled`, not `queued`)."""

    applied: bool
    previous: str
    batch_done: bool
    state: str = ""


class Transitions:
    """The state changes of `Ledger` (which builds what these attributes name)."""

    keys: Keys
    status_ttl_s: int
    lease_s: float
    _transition: Script
    _outcomes: Outcomes

    if TYPE_CHECKING:

        def job(self, job_id: str) -> JobRecord: ...

    def transition(
        self,
        job_id: str,
        allowed_from: Iterable[JobState],
        to: JobState,
        fields: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
        lease_expired: bool = False,
        charge_attempt: bool = True,
    ) -> Transition:
        """Move a job to `to` if it is in one of `allowed_from`; raise UnknownId if it is gone.

        With `owner`, the change also needs the job to be held by that worker; with
        `lease_expired`, its lease must have expired by Redis's clock. `charge_attempt=False` on a
        move back to `queued` does not count the attempt that ends. A running job whose cancel
        was requested is never re-queued: that move ends it `cancelled` (see `Transition.state`).
        """
        args = self._transition_args(
            job_id,
            allowed_from,
            to,
            fields,
            owner=owner,
            lease_expired=lease_expired,
            charge_attempt=charge_attempt,
        )
        code, previous, done, now_in = self._transition(args=args)
        if code == -1:
            raise unknown_job(job_id)
        state = _s(now_in)
        if code == 1 and state in (JobState.SUCCEEDED, JobState.FAILED):
            self._outcomes.record(job_id, JobState(state), fields or {})
        return Transition(
            applied=code == 1, previous=_s(previous), batch_done=bool(done), state=state
        )

    def requeue_or_fail(
        self,
        job_id: str,
        reason: str,
        *,
        charge_attempt: bool,
        max_attempts: int,
        owner: str | None = None,
        lease_expired: bool = False,
        code: FailureReason = FailureReason.OTHER,
        fields: dict[str, Any] | None = None,
    ) -> str:
        """The one policy for a `running` job whose attempt ended without an image.

        - Its cancel was requested: `cancelled`, never rendered again.
        - The attempt counts (`charge_attempt`, the job's own failure or a lost worker) and it
          has used `max_attempts`: `failed` with `reason` and reason code `code`.
        - Otherwise `queued` again, first in its lane; with `charge_attempt=False` (the farm
          failed, not the job: storage down, a shutdown) the attempt is not counted.

        `owner` and `lease_expired` make it a compare-and-set on who holds the job and whether
        its lease really lapsed (the reconciler). Returns the job's state afterwards, or "" when
        the move was refused (someone else moved it first).
        """
        record = self.job(job_id)
        extra = dict(fields or {})
        if record.cancel_requested:
            to = JobState.CANCELLED
            extra |= {"error": f"cancelled ({reason})", "reason": FailureReason.CANCELLED.value}
        elif charge_attempt and record.attempts >= max_attempts:
            to = JobState.FAILED
            before = f" (before that: {record.last_error})" if record.last_error else ""
            error = f"{reason}; gave up after {record.attempts} attempts{before}"
            extra |= {"error": error, "reason": code.value}
        else:
            to = JobState.QUEUED
            extra["last_error"] = reason
        if to is not JobState.QUEUED:
            extra.setdefault("finished_at", time.time())
        result = self.transition(
            job_id,
            [JobState.RUNNING],
            to,
            extra,
            owner=owner,
            lease_expired=lease_expired,
            charge_attempt=charge_attempt,
        )
        return result.state if result.applied else ""

    def _transition_args(
        self,
        job_id: str,
        allowed_from: Iterable[JobState],
        to: JobState,
        fields: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
        lease_expired: bool = False,
        charge_attempt: bool = True,
    ) -> list[Any]:
        args: list[Any] = [
            self.keys.prefix,
            job_id,
            batch_of(job_id),
            to.value,
            self.status_ttl_s,
            repr(float(self.lease_s)),
            owner or "",
            "1" if lease_expired else "",
            "1" if charge_attempt else "0",
        ]
        froms = [state.value for state in allowed_from]
        args += [len(froms), *froms]
        for name, value in (fields or {}).items():
            args += [name, json.dumps(value) if isinstance(value, dict | list) else value]
        return args

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
