"""Each tenant's jobs not yet final (queued or running): the count `max_queued_jobs` bounds.

The count is one counter per tenant (`Keys.tenant_open`), moved only inside the ledger's atomic
writes: the submit's transaction adds a batch's jobs (`shared.ledger.submit`, which WATCHes,
checks and raises it in that transaction when the tenant has a limit), TRANSITION takes one off
at a job's first final state, RETRY_JOBS adds the re-queued ones back. Batches from before the
count existed carry no `open_counted` mark and are never taken off.
"""

from __future__ import annotations

import redis

from shared.keys import Keys
from shared.ledger.submit import check_open

__all__ = ["OpenJobs"]


class OpenJobs:
    """Reads of the count, and the early look submit takes before it writes; `Ledger.open_jobs`."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def count(self, tenant: str) -> int:
        """The tenant's jobs queued or running now."""
        return int(self.client.get(self.keys.tenant_open(tenant)) or 0)

    def check(self, tenant: str, jobs: int, max_open: int) -> None:
        """RateLimited when `jobs` more would take the tenant past `max_open` now: a look before
        a body is written; `Ledger.create_batch` checks again, atomically."""
        check_open(tenant, self.count(tenant), jobs, max_open)
