"""What happens when a batch ends: its manifest is stored next to its images, it leaves the set
of active batches, and its webhook (if it has a `callback_url`) is scheduled.

The ledger's TRANSITION pushes a batch id onto the `finished` list in the same atomic step that
ends the batch. A finisher thread in each API process moves ids from there to `finishing` while
it works on them (BLMOVE), so an id whose finisher died is picked up again at the next start:
every ended batch gets its manifest and webhook at least once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from producer import webhooks
from producer.manifest import write_manifest
from shared.config import Settings
from shared.errors import StorageError, UnknownId
from shared.ledger import Ledger
from shared.storage import Storage

__all__ = ["Finisher", "summary"]

log = logging.getLogger(__name__)

STORAGE_RETRY_S = 2.0  # a manifest that could not be stored is tried again after this


class Finisher:
    """Consumes the ledger's `finished` list."""

    def __init__(self, ledger: Ledger, storage: Storage, settings: Settings) -> None:
        self.ledger = ledger
        self.storage = storage
        self.settings = settings

    def run(self, stop: threading.Event) -> None:
        keys = self.ledger.keys
        recovered = False
        while not stop.is_set():
            try:
                if not recovered:
                    self.recover()
                    recovered = True
                # redis-py types the timeout as int; Redis takes fractional seconds.
                timeout: Any = 0.5
                raw = self.ledger.redis.blmove(
                    keys.finished(), keys.finishing(), timeout, src="LEFT", dest="RIGHT"
                )
                if raw is None:
                    continue
                batch_id = raw.decode() if isinstance(raw, bytes) else str(raw)
                try:
                    self.finish(batch_id)
                except StorageError as e:
                    log.warning("batch %s: manifest not stored (%s); trying again", batch_id, e)
                    stop.wait(STORAGE_RETRY_S)
                    self.ledger.redis.rpush(keys.finished(), batch_id)
                self.ledger.redis.lrem(keys.finishing(), 1, batch_id)
            except redis.RedisError as e:
                log.warning("finisher: redis unavailable (%s); retrying", e)
                stop.wait(1.0)

    def recover(self) -> None:
        """Hand back ids a previous finisher took but never completed."""
        keys = self.ledger.keys
        while self.ledger.redis.lmove(keys.finishing(), keys.finished(), "LEFT", "RIGHT"):
            pass

    def finish(self, batch_id: str) -> None:
        """Store the manifest, leave the active set, schedule the webhook."""
        try:
            record = self.ledger.batch(batch_id)
        except UnknownId:
            log.info("batch %s: ended but its record expired; nothing to do", batch_id)
            return
        counts = record["counts"]
        if counts["queued"] + counts["running"]:
            log.info("batch %s: retried before its end was handled; waiting for the next", batch_id)
            return
        key = write_manifest(self.ledger, self.storage, batch_id)
        pipe = self.ledger.redis.pipeline(transaction=True)
        pipe.hset(self.ledger.keys.batch(batch_id), "manifest", key)
        pipe.zrem(self.ledger.keys.active_batches(), batch_id)
        pipe.execute()
        url = record.get("callback_url")
        if url:
            payload = summary(record) | {
                "manifest": {"key": key, "uri": self.storage.describe(key)}
            }
            webhooks.enqueue(self.ledger, batch_id, url, payload)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The webhook body for a batch record from `Ledger.batch`."""
    finished = record.get("finished_at")
    return {
        "event": "batch.finished",
        "batch_id": record["batch_id"],
        "total": record["total"],
        "counts": record["counts"],
        "priority": int(record["priority"]) if record.get("priority") else None,
        "created_at": float(record["created_at"]),
        "finished_at": float(finished) if finished else time.time(),
        "cancelled": bool(record.get("cancelled_at")),
    }
