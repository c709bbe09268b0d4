"""The webhook delivery queue: deliveries wait in a sorted set scored by when they are due.

A member is the delivery itself (JSON: id, batch, URL, body, attempts so far), so one ZADD
schedules it and one ZREM ends it. A sender claims a due delivery with a compare-and-set that
pushes its due time past the attempt, so a sender that dies mid-delivery leaves it to be tried
again (at least once). A delivery's id is given by its caller (fixed per batch event, so a
repeat enqueue of the same event is the same delivery to a receiver), and an enqueue
`once_for` one end of a batch schedules it only the first time, whichever API process asks.
The batch record carries the outcome (`webhook_state`, `_attempts`, `_error`,
`_delivered_at`) for the API to show.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

from shared.keys import Keys
from shared.keys import text as _s

__all__ = ["Delivery", "WebhookQueue"]

log = logging.getLogger(__name__)

_ERROR_CHARS = 300  # the error kept on the batch record is cut to this

# Claim a due delivery: move its due time past this attempt, only if it is (still) due.
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""

# Schedule a delivery (KEYS: queue, batch; ARGV: member, due, once_for): unless `once_for` is
# given and a delivery for it was scheduled already (the batch's `webhook_for`).
_ENQUEUE = """
if ARGV[3] ~= '' then
  if redis.call('HGET', KEYS[2], 'webhook_for') == ARGV[3] then return 0 end
  redis.call('HSET', KEYS[2], 'webhook_for', ARGV[3])
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], 'webhook_state', 'pending', 'webhook_attempts', 0, 'webhook_error', '')
return 1
"""


@dataclass(frozen=True)
class Delivery:
    """One webhook delivery: `attempts` made so far; `member` is its entry in the queue."""

    delivery_id: str
    batch_id: str
    url: str
    body: str
    attempts: int
    member: str


class WebhookQueue:
    """Schedules, claims and settles webhook deliveries."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._claim = client.register_script(_CLAIM)
        self._enqueue = client.register_script(_ENQUEUE)

    def enqueue(
        self, batch_id: str, url: str, body: str, delivery_id: str, *, once_for: str = ""
    ) -> Delivery | None:
        """Schedule a POST of `body` to `url` now, and mark the batch's webhook pending.

        With `once_for` (the end of the batch it reports, its `finished_at`), only the first
        enqueue for that end schedules anything; a repeat returns None. A finisher that took
        over from one that died after scheduling it so sends no second delivery.
        """
        member = _member(delivery_id, batch_id, url, body, attempts=0)
        keys = [self.keys.webhooks(), self.keys.batch(batch_id)]
        if not self._enqueue(keys=keys, args=[member, time.time(), once_for]):
            return None
        return _delivery(member)

    def due(self, now: float, limit: int) -> list[Delivery]:
        """Up to `limit` deliveries due at `now`, soonest first (not yet claimed)."""
        members = self.client.zrangebyscore(self.keys.webhooks(), "-inf", now, start=0, num=limit)
        deliveries = []
        for member in (_s(raw) for raw in members):
            try:
                deliveries.append(_delivery(member))
            except (ValueError, KeyError, TypeError) as e:  # not written by `enqueue`: drop it
                log.warning("webhook queue: dropping an unreadable delivery (%r)", e)
                self.client.zrem(self.keys.webhooks(), member)
        return deliveries

    def claim(self, delivery: Delivery, now: float, hold_until: float) -> bool:
        """Take a due delivery for one attempt: no other sender sees it due before `hold_until`."""
        key = self.keys.webhooks()
        return bool(self._claim(keys=[key], args=[delivery.member, now, hold_until]))

    def record_attempt(
        self, delivery: Delivery, *, error: str = "", retry_at: float | None = None
    ) -> str:
        """Settle a claimed attempt and return the webhook's state on the batch record.

        No `error`: delivered. An error with `retry_at`: scheduled again then, as the same
        delivery with one more attempt ("retrying"). An error without: given up ("failed").
        """
        attempts = delivery.attempts + 1
        fields: dict[Any, Any] = {
            "webhook_attempts": attempts,
            "webhook_error": error[:_ERROR_CHARS],
        }
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.keys.webhooks(), delivery.member)
        if not error:
            fields |= {"webhook_state": "delivered", "webhook_delivered_at": repr(time.time())}
        elif retry_at is None:
            fields["webhook_state"] = "failed"
        else:
            fields["webhook_state"] = "retrying"
            again = _member(
                delivery.delivery_id, delivery.batch_id, delivery.url, delivery.body, attempts
            )
            pipe.zadd(self.keys.webhooks(), {again: retry_at})
        pipe.hset(self.keys.batch(delivery.batch_id), mapping=fields)
        pipe.execute()
        return str(fields["webhook_state"])


def _member(delivery_id: str, batch_id: str, url: str, body: str, attempts: int) -> str:
    record = {"id": delivery_id, "batch_id": batch_id, "url": url, "body": body}
    return json.dumps(record | {"attempt": attempts})


def _delivery(member: str) -> Delivery:
    record = json.loads(member)
    return Delivery(
        delivery_id=str(record["id"]),
        batch_id=str(record["batch_id"]),
        url=str(record["url"]),
        body=str(record["body"]),
        attempts=int(record["attempt"]),
        member=member,
    )
