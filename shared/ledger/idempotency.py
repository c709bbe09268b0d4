"""Idempotency records: an `Idempotency-Key` (per API key) -> the batch its submission made.

A record is claimed `pending` with a short TTL before the batch is written, so two concurrent
submissions with one key cannot both make a batch; once the batch exists it becomes `done` with
the batch id and the body's hash, kept as long as job records. A submission that fails gives the
key back.
"""

from __future__ import annotations

from typing import Any

import redis

from shared.keys import Keys
from shared.keys import text as _s

__all__ = ["IdempotencyKeys"]


class IdempotencyKeys:
    """Claims, completes and gives back idempotency records."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def begin(self, scope: str, key_hash: str, pending_ttl_s: int) -> dict[str, str] | None:
        """Claim the key (None), or return the earlier submission's record when it is taken.

        The record has `state` ("pending" or "done"); a done one also `batch_id`, `sha256` and
        `total`.
        """
        name = self.keys.idempotency(scope, key_hash)
        if self.client.hsetnx(name, "state", "pending"):
            self.client.expire(name, pending_ttl_s)
            return None
        raw = self.client.hgetall(name)
        # Gone between the two calls (its pending TTL ran out): still someone else's, for now.
        return {_s(k): _s(v) for k, v in raw.items()} or {"state": "pending"}

    def complete(
        self, scope: str, key_hash: str, *, batch_id: str, sha256: str, total: int, ttl_s: int
    ) -> None:
        """Mark the claimed key done: it now answers with `batch_id` for `ttl_s`."""
        name = self.keys.idempotency(scope, key_hash)
        mapping: dict[Any, Any] = {
            "state": "done",
            "batch_id": batch_id,
            "sha256": sha256,
            "total": total,
        }
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(name, mapping=mapping)
        pipe.expire(name, ttl_s)
        pipe.execute()

    def abandon(self, scope: str, key_hash: str) -> None:
        """Give a claimed key back: its submission failed, the next one may try."""
        self.client.delete(self.keys.idempotency(scope, key_hash))
