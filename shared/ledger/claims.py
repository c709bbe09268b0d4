"""Claims: a key that one owner holds for a while and renews while it lives (the active
dispatcher's lock, a supervisor's GPU). Taking, renewing and releasing are compare-and-sets on the
owner, so an owner that paused past its TTL cannot take back what another has taken since.
"""

from __future__ import annotations

import redis

from shared.keys import Keys
from shared.keys import text as _s

__all__ = ["Claim", "dispatch_lock", "gpu_claim"]

# Renew the claim if we own it, take it if nobody does: 1 renewed, 2 taken, 0 held by another.
_HOLD = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Claim:
    """One claimable key."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client = client
        self.key = key
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)

    def hold(self, owner: str, ttl_s: float) -> int:
        """Renew it if `owner` holds it (1), take it if it is free (2); 0 if another holds it."""
        return int(self._hold(keys=[self.key], args=[owner, int(ttl_s * 1000)]))

    def release(self, owner: str) -> bool:
        """Give it up if `owner` still holds it (it expires on its own otherwise)."""
        return bool(self._release(keys=[self.key], args=[owner]))

    def holder(self) -> str | None:
        """Who holds it now, if anyone."""
        value = self.client.get(self.key)
        return None if value is None else _s(value)


def dispatch_lock(client: redis.Redis, keys: Keys) -> Claim:
    """The lock of the one active dispatcher of the farm."""
    return Claim(client, keys.dispatcher_lock())


def gpu_claim(client: redis.Redis, keys: Keys, gpu_uuid: str) -> Claim:
    """A supervisor's claim on one GPU (by UUID, unique across machines)."""
    return Claim(client, keys.gpu_claim(gpu_uuid))
