"""What the producer's background loops keep in Redis: the dispatcher's lease lock, and the
finisher's ended batches with their claims.

- The dispatch lock is a claim (`shared.ledger.claims`): one key holding the active dispatcher's
  id, with a TTL its holder renews, so a paused dispatcher cannot steal it back from the one that
  took over.
- TRANSITION pushes a batch id onto `finished` in the step that ends the batch. A finisher takes
  it from there and claims it in one step (`take_ended_batch`): the claim names the finisher and
  lapses `lease_s` after its last renewal. The finisher renews it before each step of the finish
  (a renewal that fails means the batch was handed to another: it stops), and drops it once the
  finish is done. Any finisher hands a lapsed claim's batch back to `finished`
  (`recover_lapsed_finishes`), so the batch of an API process that died mid-finish is finished
  by another, and two live processes never finish the same end of a batch at once.
- `mark_finished` records the manifest together with the end it was written for (the batch's
  `finished_at`), so a finisher that takes over knows the manifest is stored already.
"""

from __future__ import annotations

from typing import Any

import redis

from shared.keys import Keys
from shared.keys import text as _s
from shared.ledger.claims import dispatch_lock

__all__ = ["Loops"]

# KEYS: finished, claims, owners. ARGV: owner, lease_ms. Take the next ended batch and claim it.
_TAKE = """
local id = redis.call('LPOP', KEYS[1])
if not id then return false end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[2]), id)
redis.call('HSET', KEYS[3], id, ARGV[1])
return id
"""
# KEYS: claims, owners. ARGV: batch id, owner, lease_ms. Renew the claim if `owner` holds it.
_RENEW = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[1])
return 1
"""
# KEYS: claims, owners, finished. ARGV: batch id, owner, '1' to hand it back to `finished`.
_RELEASE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if ARGV[3] == '1' then redis.call('RPUSH', KEYS[3], ARGV[1]) end
return 1
"""
# KEYS: claims, owners, finished. Hand every batch whose claim lapsed back to `finished`.
_RECOVER = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, 100)
for _, id in ipairs(lapsed) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('RPUSH', KEYS[3], id)
end
return #lapsed
"""
# KEYS: owners, batch, active. ARGV: batch id, owner ('' = unclaimed), manifest key, end.
_MARK = """
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], 'manifest', ARGV[3], 'manifest_for', ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""


class Loops:
    """The dispatch lock, and the ended batches with their finish claims."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._lock = dispatch_lock(client, keys)
        self._take = client.register_script(_TAKE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._recover = client.register_script(_RECOVER)
        self._mark = client.register_script(_MARK)

    # -- the dispatch lock ----------------------------------------------------------------------

    def hold_dispatch_lock(self, owner: str, ttl_s: float) -> bool:
        """Renew the lock if `owner` holds it, or take it if it is free; True if `owner` has it."""
        return self._lock.hold(owner, ttl_s) > 0

    def release_dispatch_lock(self, owner: str) -> bool:
        """Give the lock up if `owner` still holds it (it expires on its own otherwise)."""
        return self._lock.release(owner)

    # -- ended batches and their finish claims ----------------------------------------------------

    def wait_for_ended_batch(self, timeout_s: float) -> bool:
        """Block until some batch waits in `finished` (True) or `timeout_s` passed (False).

        Moving the list's head onto its head changes nothing, so no batch is taken here: every
        waiting finisher wakes, and `take_ended_batch` decides which one gets it.
        """
        timeout: Any = timeout_s  # redis-py types it as int; Redis takes fractional seconds
        finished = self.keys.finished()
        return self.client.blmove(finished, finished, timeout, src="LEFT", dest="LEFT") is not None

    def take_ended_batch(self, owner: str, lease_s: float) -> str | None:
        """The next ended batch, claimed by `owner` for `lease_s`; None when none waits."""
        keys = [self.keys.finished(), self.keys.finish_claims(), self.keys.finish_owners()]
        raw = self._take(keys=keys, args=[owner, _ms(lease_s)])
        return None if raw is None else _s(raw)

    def renew_finish(self, batch_id: str, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s claim on the batch; False when it holds it no longer (handed over)."""
        keys = [self.keys.finish_claims(), self.keys.finish_owners()]
        return bool(self._renew(keys=keys, args=[batch_id, owner, _ms(lease_s)]))

    def release_finish(self, batch_id: str, owner: str, *, again: bool = False) -> bool:
        """Drop `owner`'s claim: the finish is done, or (`again`) hand the batch back to be
        finished later. False when `owner` held it no longer."""
        keys = [self.keys.finish_claims(), self.keys.finish_owners(), self.keys.finished()]
        return bool(self._release(keys=keys, args=[batch_id, owner, "1" if again else "0"]))

    def finish_owner(self, batch_id: str) -> str | None:
        """Who holds the batch's finish claim now, if anyone (for tools and tests)."""
        raw = self.client.hget(self.keys.finish_owners(), batch_id)
        return None if raw is None else _s(raw)

    def recover_lapsed_finishes(self) -> int:
        """Hand back every batch whose finisher stopped renewing its claim; how many.

        Batches a finisher from before finish claims left in the old `finishing` list are
        handed back too (no finisher writes that list any more).
        """
        keys = [self.keys.finish_claims(), self.keys.finish_owners(), self.keys.finished()]
        moved = int(self._recover(keys=keys))
        while self.client.lmove(self.keys.finishing(), self.keys.finished(), "LEFT", "RIGHT"):
            moved += 1
        return moved

    def mark_finished(
        self, batch_id: str, manifest_key: str, *, end: str, owner: str | None = None
    ) -> bool:
        """Record the batch's manifest, written for the end `end` (its `finished_at`), and take
        it out of the active batches, in one step; with `owner`, only while it holds the claim."""
        keys = [self.keys.finish_owners(), self.keys.batch(batch_id), self.keys.active_batches()]
        return bool(self._mark(keys=keys, args=[batch_id, owner or "", manifest_key, end]))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
