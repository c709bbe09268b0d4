"""What the producer's background loops keep in Redis: the dispatcher's lease lock, and the
finisher's lists of ended batches.

- The dispatch lock is a claim (`shared.ledger.claims`): one key holding the active dispatcher's
  id, with a TTL its holder renews, so a paused dispatcher cannot steal it back from the one that
  took over.
- TRANSITION pushes a batch id onto `finished` in the step that ends the batch. A finisher moves
  it to `finishing` while it works on it (BLMOVE), so an id whose finisher died is handed back at
  the next start: every ended batch is handled at least once.
"""

from __future__ import annotations

from typing import Any

import redis

from shared.keys import Keys
from shared.keys import text as _s
from shared.ledger.claims import dispatch_lock

__all__ = ["Loops"]


class Loops:
    """The dispatch lock and the ended-batch lists, for the dispatcher and the finisher."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._lock = dispatch_lock(client, keys)

    # -- the dispatch lock ----------------------------------------------------------------------

    def hold_dispatch_lock(self, owner: str, ttl_s: float) -> bool:
        """Renew the lock if `owner` holds it, or take it if it is free; True if `owner` has it."""
        return self._lock.hold(owner, ttl_s) > 0

    def release_dispatch_lock(self, owner: str) -> bool:
        """Give the lock up if `owner` still holds it (it expires on its own otherwise)."""
        return self._lock.release(owner)

    # -- ended batches --------------------------------------------------------------------------

    def take_ended_batch(self, timeout_s: float) -> str | None:
        """The next ended batch, moved to `finishing`; None when none came within `timeout_s`."""
        # redis-py types the timeout as int; Redis takes fractional seconds.
        timeout: Any = timeout_s
        raw = self.client.blmove(
            self.keys.finished(), self.keys.finishing(), timeout, src="LEFT", dest="RIGHT"
        )
        return None if raw is None else _s(raw)

    def ended_batch_handled(self, batch_id: str) -> None:
        """Forget a batch taken by `take_ended_batch`: its end has been handled."""
        self.client.lrem(self.keys.finishing(), 1, batch_id)

    def put_back_ended_batch(self, batch_id: str) -> None:
        """Hand a taken batch back to `finished`, to be handled again (its manifest failed)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(self.keys.finished(), batch_id)
        pipe.lrem(self.keys.finishing(), 1, batch_id)
        pipe.execute()

    def recover_ended_batches(self) -> int:
        """Hand back every batch a previous finisher took but never handled; how many."""
        moved = 0
        while self.client.lmove(self.keys.finishing(), self.keys.finished(), "LEFT", "RIGHT"):
            moved += 1
        return moved

    def mark_finished(self, batch_id: str, manifest_key: str) -> None:
        """Record the batch's manifest and take it out of the active batches, in one step."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.batch(batch_id), "manifest", manifest_key)
        pipe.zrem(self.keys.active_batches(), batch_id)
        pipe.execute()
