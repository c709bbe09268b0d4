"""Step 5 of a chunk: the ledger moves a worker makes once it holds a job. No other worker module
moves a job after its claim.

- `succeeded`: only after its object is stored, with the key, timings, worker and model hash.
- `fail_now`: a failure no retry will mend (a spec or init image that cannot be used, an image
  the precision guard refused, a store that refuses the workers), with its reason code.
- `give_back`: an attempt that ended without an image goes through `Ledger.requeue_or_fail`,
  the one policy the reconciler uses too: charged or not, cancelled if its cancel was requested.
- `storage_failed`: a store that is down hands the job back without charging an attempt, until
  it has been failing the job for `storage_give_up_s`; then the job fails with the store's error.

`Reporter` holds the three things every move needs (the ledger, the settings, the worker's id).
Every move names this worker as the owner, so a worker whose lease lapsed and whose job another
worker took cannot finish or hand back that job. Each returns the job's state afterwards ("" when
the move was refused), for the chunk's outcome.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from shared.config import Settings
from shared.errors import FailureReason, StorageError
from shared.jobs import JobState
from shared.ledger import Ledger

__all__ = ["Reporter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reporter:
    """A worker's ledger moves for the jobs it holds."""

    ledger: Ledger
    settings: Settings
    worker_id: str

    def finish(self, job_id: str, state: JobState, fields: dict[str, Any]) -> str:
        """`running` → a final state, if this worker still holds the job."""
        fields.setdefault("finished_at", time.time())
        result = self.ledger.transition(
            job_id, [JobState.RUNNING], state, fields, owner=self.worker_id
        )
        if not result.applied:
            log.info("job %s: already %s, not marking %s", job_id, result.previous, state.value)
            return ""
        log.info("job %s: %s", job_id, result.state)
        return result.state

    def succeeded(self, job_id: str, fields: dict[str, Any]) -> str:
        """The job's image is stored: `succeeded`, with what the record shows about it."""
        return self.finish(job_id, JobState.SUCCEEDED, fields)

    def fail_now(self, job_id: str, error: str, code: FailureReason) -> str:
        """`failed` (`cancelled` for a cancel) at once, with the reason and its code."""
        fields = {"error": error, "reason": code.value}
        if code is FailureReason.CANCELLED:
            return self.finish(job_id, JobState.CANCELLED, fields)
        return self.finish(job_id, JobState.FAILED, fields)

    def give_back(
        self,
        job_id: str,
        reason: str,
        *,
        charge_attempt: bool,
        code: FailureReason = FailureReason.RENDER_FAILED,
        fields: dict[str, Any] | None = None,
    ) -> str:
        """Another attempt later, or `failed` once the attempts are spent (when charged)."""
        state = self.ledger.requeue_or_fail(
            job_id,
            reason,
            charge_attempt=charge_attempt,
            max_attempts=self.settings.max_attempts,
            owner=self.worker_id,
            code=code,
            fields=fields,
        )
        if state == JobState.QUEUED:
            charged = "" if charge_attempt else ", no attempt charged"
            log.warning("job %s: handed back%s: %s", job_id, charged, reason)
        elif state:
            log.warning("job %s: %s: %s", job_id, state, reason)
        return state

    def storage_failed(self, job_id: str, error: StorageError, what: str) -> str:
        """The store failed this job (`what` says how: its image, its init image).

        A store that refused (`retryable` False: credentials, permissions, no such bucket) fails
        the job at once with the store's reason. One that is down hands it back without charging
        an attempt, while it has been failing the job for less than `storage_give_up_s`.
        """
        if not error.retryable:
            message = (
                f"{what}: the store refused it ({error}); fix the store's settings, then retry"
            )
            return self.fail_now(job_id, message, FailureReason.STORAGE)
        now = self.ledger.server_time()
        since = self.ledger.job(job_id).storage_failing_since or now
        failing_s = now - since
        limit_s = self.settings.storage_give_up_s
        if limit_s and failing_s >= limit_s:
            failing = f"{failing_s:.0f} s" if failing_s < 120 else f"{failing_s / 60:.0f} min"
            message = (
                f"{what} for {failing} ({error}); check the S3 store, its bucket and the "
                "workers' credentials, then retry the job"
            )
            return self.fail_now(job_id, message, FailureReason.STORAGE)
        return self.give_back(
            job_id,
            f"storage unavailable: {error}",
            charge_attempt=False,
            code=FailureReason.STORAGE,
            fields={"storage_failing_since": since},
        )
