"""Waiting for replicas after a submit (`SDFARM_REDIS_WAIT_REPLICAS`), for a Redis that fails over.

Redis replicates asynchronously: the master answers a write before any replica has it, so a
master that dies a moment after a batch was accepted can take the batch with it when Sentinel
promotes a replica. WAIT narrows that window: the API answers only once `replicas` replicas
acknowledged the batch, or after `timeout_ms` (then it answers anyway and logs it, as Redis's
WAIT itself rolls nothing back). It is not a guarantee: a replica acknowledges what it received,
not what it wrote to disk, and Sentinel may still promote a replica that had not.
"""

from __future__ import annotations

import logging

import redis

from shared.keys import Keys

__all__ = ["wait_for_replicas"]

log = logging.getLogger(__name__)


def wait_for_replicas(
    client: redis.Redis, keys: Keys, batch_id: str, replicas: int, timeout_ms: int, *, ttl_s: int
) -> int:
    """Block until `replicas` replicas hold everything written up to batch `batch_id`'s commit,
    or `timeout_ms` passed; return how many acknowledged.

    WAIT counts the writes of the connection it is sent on, and the pool may hand the submit's
    commit and this call different connections: so WAIT follows a write of its own on one
    connection (the batch's TTL, set again to what it is), which the replication stream carries
    after the commit.
    """
    pipe = client.pipeline(transaction=False)
    pipe.expire(keys.batch(batch_id), ttl_s)
    pipe.execute_command("WAIT", replicas, timeout_ms)  # type: ignore[no-untyped-call]
    acknowledged = int(pipe.execute()[-1])
    if acknowledged < replicas:
        log.warning(
            "batch %s: %d of %d replicas acknowledged it within %d ms; a failover now may lose it",
            batch_id,
            acknowledged,
            replicas,
            timeout_ms,
        )
    return acknowledged
