"""The worker registry: each worker process publishes a heartbeat record with a TTL.

`Workers` is the registry as the ledger exposes it (`Ledger.workers`); the two functions below
are the same operations for callers holding only a client and the key names.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from shared.keys import Keys

__all__ = ["Workers", "live_workers", "publish_heartbeat"]


def publish_heartbeat(
    client: redis.Redis, keys: Keys, worker_id: str, record: dict[str, Any], ttl_s: float
) -> None:
    """Write (or renew) the worker's record; it disappears `ttl_s` after the last call."""
    key = keys.worker(worker_id)
    fields: dict[Any, Any] = {name: json.dumps(value) for name, value in record.items()}
    fields["last_seen"] = json.dumps(time.time())
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, mapping=fields)
    pipe.pexpire(key, int(ttl_s * 1000))
    pipe.sadd(keys.workers(), worker_id)
    pipe.execute()


def live_workers(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """Records of workers whose heartbeat has not expired; forgets the ones that have."""
    ids = sorted(v.decode() if isinstance(v, bytes) else v for v in client.smembers(keys.workers()))
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    for worker_id in ids:
        pipe.hgetall(keys.worker(worker_id))
    out, gone = [], []
    for worker_id, raw in zip(ids, pipe.execute(), strict=True):
        if not raw:
            gone.append(worker_id)
            continue
        record = {k.decode(): json.loads(v) for k, v in raw.items()}
        out.append({"worker_id": worker_id, **record})
    if gone:
        client.srem(keys.workers(), *gone)
    return out


class Workers:
    """The worker registry of one farm: heartbeats in, live worker records out."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def publish(self, worker_id: str, record: dict[str, Any], ttl_s: float) -> None:
        """Write (or renew) the worker's record; it disappears `ttl_s` after the last call."""
        publish_heartbeat(self.client, self.keys, worker_id, record, ttl_s)

    def live(self) -> list[dict[str, Any]]:
        """Records (`worker_id` plus its heartbeat fields) of workers whose heartbeat holds."""
        return live_workers(self.client, self.keys)

    def forget(self, worker_id: str) -> None:
        """Remove a stopping worker's record at once, rather than when its heartbeat expires."""
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.keys.worker(worker_id))
        pipe.srem(self.keys.workers(), worker_id)
        pipe.execute()
