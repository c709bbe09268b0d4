"""A tenant's limits, applied where work enters (`POST /v1/batches`, JSON and NDJSON alike).

- `max_jobs_per_batch`: a batch over the lower of the tenant's and the farm's setting is a 422,
  refused as soon as the job past the limit arrives (an NDJSON body is not read further);
- `max_priority`: a priority above the tenant's is a 422 naming the allowed range;
- `submits_per_minute`: one more submit than the tenant's window holds is a 429 with
  `Retry-After`. The window is fixed (`shared.ledger.rates`): it opens at the tenant's first
  submit and lasts a minute; a rate below 1 widens it instead (0.5: one batch every 120 s), and
  a fraction above 1 is rounded down. Only an accepted batch is counted: the count is taken
  after every job is validated, just before the batch is written, so a refused (422) submit
  costs nothing; an early look before the body is read spares a limited tenant's big body.
- `max_queued_jobs`: the tenant's jobs not yet final (queued or running) are bounded. A batch
  that alone is over the limit can never be accepted: a 422. One that would take the count past
  it waits for the tenant's own jobs to end: a 429 with `Retry-After` (30 s), naming the limit,
  the count and the batch's size. The ledger keeps the count exactly (`Ledger.open_jobs`): the
  submit's transaction adds the batch, each job's first final state takes it off, a retry adds
  it again; the check is made in that same transaction (WATCH), so concurrent submits cannot
  pass the limit together. A retry (`POST .../retry`) is counted but never refused.

Admins, and every caller of an open farm (no keys), have no tenant limits: only the farm's own
settings apply to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from producer.tenants import Caller, Limits
from shared.errors import InvalidJob, RateLimited
from shared.ledger import Ledger

__all__ = ["Quota", "quota_of"]

_MINUTE_S = 60.0


@dataclass(frozen=True)
class Quota:
    """One tenant's limits, as submit applies them."""

    tenant: str
    limits: Limits

    def max_jobs(self, farm_max_jobs: int) -> int | None:
        """The tenant's `max_jobs_per_batch` where it is below the farm's, else None (the
        farm's own check, which names the farm's setting, applies)."""
        own = self.limits.max_jobs_per_batch
        return own if own is not None and own < farm_max_jobs else None

    def too_many_jobs(self, index: int, size: int | None) -> InvalidJob:
        """The refusal of a batch whose job `index` is one past the tenant's limit; `size` is
        the batch's size where it is known (a JSON body), None for a stream cut short."""
        limit = self.limits.max_jobs_per_batch
        has = f"this batch has {size}" if size is not None else f"this batch has more than {limit}"
        message = (
            f"tenant {self.tenant!r} may put at most {limit} jobs in a batch (its "
            f"max_jobs_per_batch is {limit}), and {has}; split it"
        )
        return InvalidJob(
            message, [{"job": index, "field": "jobs", "value": size, "message": message}]
        )

    def max_open(self) -> int | None:
        """The tenant's `max_queued_jobs`, which the ledger checks as it writes the batch."""
        return self.limits.max_queued_jobs

    def check_queued(self, ledger: Ledger, size: int) -> None:
        """Refuse a batch of `size` jobs over `max_queued_jobs`: 422 when it alone is, else a
        look (429) before anything is written; the ledger checks again, atomically."""
        limit = self.limits.max_queued_jobs
        if limit is None:
            return
        if size > limit:
            message = (
                f"tenant {self.tenant!r} may have at most {limit} jobs queued or running (its "
                f"max_queued_jobs is {limit}), and this batch alone has {size}; split it"
            )
            raise InvalidJob(message, [{"field": "jobs", "value": size, "message": message}])
        ledger.open_jobs.check(self.tenant, size, limit)

    def check_priority(self, priority: int) -> None:
        """Refuse a priority above the tenant's `max_priority` (422)."""
        top = self.limits.max_priority
        if top is None or priority <= top:
            return
        message = (
            f"priority {priority} is above what tenant {self.tenant!r} may ask for: 0-{top} "
            f"(its max_priority is {top})"
        )
        raise InvalidJob(message, [{"field": "priority", "value": priority, "message": message}])

    def check_rate(self, ledger: Ledger, *, take: bool) -> None:
        """Refuse a submit past `submits_per_minute` (429); with `take`, count an allowed one."""
        rate = self.limits.submits_per_minute
        if rate is None:
            return
        limit, window_s = _window(rate)
        check = ledger.rates.check(self.tenant, limit=limit, window_s=window_s, take=take)
        if check.allowed:
            return
        retry_after_s = max(1, math.ceil(check.retry_after_s))
        allowed = (
            f"{limit} batch{'es' if limit > 1 else ''} a minute"
            if window_s == _MINUTE_S
            else f"one batch every {window_s:g} s"
        )
        raise RateLimited(
            f"tenant {self.tenant!r} may submit {allowed} (its submits_per_minute is {rate:g}); "
            f"try again in {retry_after_s} s",
            retry_after_s,
        )


def _window(rate: float) -> tuple[int, float]:
    """(submits, seconds) of the fixed window for a rate per minute."""
    if rate >= 1:
        return math.floor(rate), _MINUTE_S
    return 1, _MINUTE_S / rate


def quota_of(caller: Caller) -> Quota | None:
    """The caller's quota; None for an admin (and so for an open farm's callers)."""
    return None if caller.admin else Quota(caller.name, caller.tenant.limits)
