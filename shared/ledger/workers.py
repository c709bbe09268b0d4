"""The worker registry: each worker process publishes a heartbeat record with a TTL."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from shared.keys import Keys

__all__ = ["live_workers", "publish_heartbeat"]


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
