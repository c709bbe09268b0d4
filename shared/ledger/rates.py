"""Per-tenant submit rates: one fixed-window counter per tenant, checked and counted in one Lua
round trip (`lua/submit_rate.lua`).

The window opens at the tenant's first submit and lasts `window_s`; the counter's TTL ends it,
so the window is timed by Redis's clock, whatever the API hosts' clocks say. A fixed window lets
a tenant send up to twice its limit across a window's end; that is the price of one counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from shared.keys import Keys
from shared.ledger.scripts import SUBMIT_RATE

__all__ = ["RateCheck", "SubmitRates"]


@dataclass(frozen=True)
class RateCheck:
    """Whether a submit fits the tenant's window, and if not, when the window frees."""

    allowed: bool
    retry_after_s: float  # 0 when allowed


class SubmitRates:
    """Checks (and counts) submits against a tenant's `limit` per `window_s`."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._script = client.register_script(SUBMIT_RATE)

    def check(self, tenant: str, *, limit: int, window_s: float, take: bool) -> RateCheck:
        """Whether one more submit fits; with `take`, an allowed one is counted, atomically with
        the check, so concurrent submits can never pass the limit together."""
        window_ms = max(1, round(window_s * 1000))
        args: list[str | int] = [self.keys.prefix, tenant, limit, window_ms, int(take)]
        allowed, retry_ms = self._script(args=args)
        return RateCheck(allowed=bool(allowed), retry_after_s=int(retry_ms) / 1000)
