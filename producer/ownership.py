"""What a caller may see: a tenant its own batches and jobs, an admin all of them.

Another tenant's batch or job is refused exactly as one that does not exist: the same 404 and the
same body (`shared.ledger.records.unknown_batch` / `unknown_job`, which the ledger raises for a
missing id too), after the same single read, so that an id cannot be probed to learn whether it
exists. Every route that takes an id calls `check_batch` or `check_job` before it reads or changes
anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from producer.tenants import Caller
from shared.ids import batch_of, is_job_id
from shared.ledger import Ledger
from shared.ledger.records import unknown_batch, unknown_job

__all__ = ["check_batch", "check_job", "visible_job_ids"]


def check_batch(ledger: Ledger, caller: Caller, batch_id: str) -> None:
    """Raise the missing batch's UnknownId unless the caller may see this batch."""
    if caller.admin:
        return  # an admin sees every batch; a missing one is refused by the read that follows
    if not caller.sees(ledger.batch_owners([batch_id])[0]):
        raise unknown_batch(batch_id)


def check_job(ledger: Ledger, caller: Caller, job_id: str) -> None:
    """Raise the missing job's UnknownId unless the caller may see the job's batch."""
    if caller.admin:
        return
    if not caller.sees(ledger.batch_owners([batch_of(job_id)])[0]):
        raise unknown_job(job_id)


def visible_job_ids(ledger: Ledger, caller: Caller, job_ids: Sequence[str]) -> set[str]:
    """Those of `job_ids` whose batch the caller may see (one round trip for all of them)."""
    if caller.admin:
        return set(job_ids)
    batches = sorted({batch_of(job_id) for job_id in job_ids if is_job_id(job_id)})
    owners = dict(zip(batches, ledger.batch_owners(batches), strict=True))
    return {j for j in job_ids if is_job_id(j) and caller.sees(owners[batch_of(j)])}
