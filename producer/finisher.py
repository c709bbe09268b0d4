"""What happens when a batch ends: its manifest is stored next to its images, it leaves the set
of active batches, and its webhook (if it has a `callback_url`) is scheduled.

The ledger's TRANSITION records a batch's end in the same atomic step that ends it. A finisher
thread in each API process takes ended batches from the ledger (`Ledger.loops`), which keeps
each one aside while it is handled, so one whose finisher died is handed back at the next start:
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
from shared.ledger import BatchRecord, Ledger
from shared.storage import Storage

__all__ = ["Finisher", "summary"]

log = logging.getLogger(__name__)

STORAGE_RETRY_S = 2.0  # a manifest that could not be stored is tried again after this
_TAKE_WAIT_S = 0.5  # longest block waiting for an ended batch, so `stop` is seen soon


class Finisher:
    """Handles the batches that ended: manifest, leaving the active set, webhook."""

    def __init__(self, ledger: Ledger, storage: Storage, settings: Settings) -> None:
        self.ledger = ledger
        self.storage = storage
        self.settings = settings

    def run(self, stop: threading.Event) -> None:
        recovered = False
        while not stop.is_set():
            try:
                if not recovered:
                    self.recover()
                    recovered = True
                batch_id = self.ledger.loops.take_ended_batch(_TAKE_WAIT_S)
                if batch_id is None:
                    continue
                try:
                    self.finish(batch_id)
                except StorageError as e:
                    log.warning("batch %s: manifest not stored (%s); trying again", batch_id, e)
                    stop.wait(STORAGE_RETRY_S)
                    self.ledger.loops.put_back_ended_batch(batch_id)
                    continue
                self.ledger.loops.ended_batch_handled(batch_id)
            except redis.RedisError as e:
                log.warning("finisher: redis unavailable (%s); retrying", e)
                stop.wait(1.0)

    def recover(self) -> None:
        """Hand back batches a previous finisher took but never completed."""
        moved = self.ledger.loops.recover_ended_batches()
        if moved:
            log.info("finisher: %d ended batches handed back from a previous finisher", moved)

    def finish(self, batch_id: str) -> None:
        """Store the manifest, leave the active set, schedule the webhook."""
        try:
            record = self.ledger.batch(batch_id)
        except UnknownId:
            log.info("batch %s: ended but its record expired; nothing to do", batch_id)
            return
        if record.remaining:
            log.info("batch %s: retried before its end was handled; waiting for the next", batch_id)
            return
        key = write_manifest(self.ledger, self.storage, batch_id)
        self.ledger.loops.mark_finished(batch_id, key)
        url = record.callback_url
        if url:
            payload = summary(record) | {
                "manifest": {"key": key, "uri": self.storage.describe(key)}
            }
            webhooks.enqueue(self.ledger, batch_id, url, payload)


def summary(record: BatchRecord) -> dict[str, Any]:
    """The webhook body for a batch record from `Ledger.batch`."""
    return {
        "event": "batch.finished",
        "batch_id": record.batch_id,
        "total": record.total,
        "counts": record.counts,
        "priority": int(record["priority"]) if record.get("priority") else None,
        "created_at": record.created_at,
        "finished_at": record.finished_at or time.time(),
        "cancelled": record.cancelled_at is not None,
    }
