"""What happens when a batch ends: its manifest is stored next to its images, it leaves the set
of active batches, and its webhook (if it has a `callback_url`) is scheduled — once per end of
the batch, however many API processes run and whichever of them dies mid-finish.

The ledger's TRANSITION records a batch's end in the same atomic step that ends it. A finisher
thread in each API process takes ended batches from the ledger and claims each one
(`Ledger.loops`, which says how the claims work):

1. Renew the claim (a finisher that lost it, to one that took over, leaves the batch).
2. Store the manifest, unless the batch records it stored for this end already (a finisher that
   died after this step), and record it with the end it was written for.
3. Renew the claim again, then schedule the webhook `once_for` this end: a repeat schedules
   nothing, so a takeover after the finisher died between 3 and 4 sends no second webhook.
4. Drop the claim.

A finish that fails (Redis or the store unavailable, or anything else) is logged with the batch
id and handed back to be tried again after a backoff; when even that fails, the claim lapses
and any API process's finisher hands it back (`recover_lapsed_finishes`, every second).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import redis

from producer import webhooks
from producer.loop_health import Backoff
from producer.manifest import write_manifest
from shared.config import Settings
from shared.errors import StorageError, UnknownId
from shared.ledger import BatchRecord, Ledger
from shared.storage import Storage

__all__ = ["Finisher", "summary"]

log = logging.getLogger(__name__)

_TAKE_WAIT_S = 0.5  # longest block waiting for an ended batch, so `stop` is seen soon
_RECOVER_EVERY_S = 1.0  # how often lapsed claims are looked for


class Finisher:
    """Handles the batches that ended: manifest, leaving the active set, webhook."""

    def __init__(self, ledger: Ledger, storage: Storage, settings: Settings) -> None:
        self.ledger = ledger
        self.storage = storage
        self.settings = settings
        # Unique per process start: a restarted process does not mistake an old claim for its own.
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._held: str | None = None  # a claimed batch whose finish failed, to hand back
        self._next_recover = 0.0

    def run(self, stop: threading.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            batch_id = self._held
            try:
                if batch_id is not None:  # a finish failed: hand it back, to be tried again
                    self.ledger.loops.release_finish(batch_id, self.owner, again=True)
                    self._held = batch_id = None
                self._recover_when_due()
                batch_id = self._take()
                if batch_id is None:
                    continue
                self._held = batch_id
                self.handle(batch_id)
                self._held = None
                backoff.reset()
            except Exception as e:  # whatever it was, the loop goes on (habit 15)
                wait_s = backoff.next_s()
                _log_failure(batch_id, e, wait_s)
                stop.wait(wait_s)

    def _take(self) -> str | None:
        if not self.ledger.loops.wait_for_ended_batch(_TAKE_WAIT_S):
            return None
        return self.ledger.loops.take_ended_batch(self.owner, self.settings.finish_lease_s)

    def _recover_when_due(self) -> None:
        now = time.monotonic()
        if now < self._next_recover:
            return
        self._next_recover = now + _RECOVER_EVERY_S
        moved = self.ledger.loops.recover_lapsed_finishes()
        if moved:
            log.warning(
                "finisher: %d ended batches handed back from a finisher that stopped", moved
            )

    def handle(self, batch_id: str) -> bool:
        """Finish a batch this finisher claimed, each step once per end of the batch; True when
        done, False when the claim was lost to another finisher (which finishes it)."""
        done = self._finish(batch_id, claimed=True)
        if done:
            self.ledger.loops.release_finish(batch_id, self.owner)
        else:
            log.info("batch %s: its finish was handed to another finisher; leaving it", batch_id)
        return done

    def finish(self, batch_id: str) -> None:
        """Finish a batch now, unclaimed: store the manifest, leave the active set, schedule the
        webhook again (with the same delivery id, so a receiver drops the repeat)."""
        self._finish(batch_id, claimed=False)

    def _finish(self, batch_id: str, *, claimed: bool) -> bool:
        if claimed and not self._renew(batch_id):
            return False
        try:
            record = self.ledger.batch(batch_id)
        except UnknownId:
            log.info("batch %s: ended but its record expired; nothing to do", batch_id)
            return True
        if record.remaining:
            log.info("batch %s: retried before its end was handled; waiting for the next", batch_id)
            return True
        key = self._store_manifest(record, claimed=claimed)
        if key is None:
            return False
        url = record.callback_url
        if url:
            self._fault_pause(batch_id)
            if claimed and not self._renew(batch_id):
                return False
            payload = summary(record) | {
                "manifest": {"key": key, "uri": self.storage.describe(key)}
            }
            once_for = _end(record) if claimed else ""
            if webhooks.enqueue(self.ledger, batch_id, url, payload, once_for=once_for) is None:
                log.info("batch %s: webhook scheduled already for this end", batch_id)
        return True

    def _store_manifest(self, record: BatchRecord, *, claimed: bool) -> str | None:
        """The manifest's key, stored now unless a claimed finish finds it stored for this end;
        None when the claim was lost meanwhile."""
        batch_id, end, key = record.batch_id, _end(record), record.manifest
        if claimed and key is not None and record.get("manifest_for") == end:
            log.info("batch %s: manifest stored already for this end, at %s", batch_id, key)
            return key
        key = write_manifest(self.ledger, self.storage, batch_id)
        owner = self.owner if claimed else None
        return key if self.ledger.loops.mark_finished(batch_id, key, end=end, owner=owner) else None

    def _renew(self, batch_id: str) -> bool:
        return self.ledger.loops.renew_finish(batch_id, self.owner, self.settings.finish_lease_s)

    def _fault_pause(self, batch_id: str) -> None:
        pause_s = self.settings.fault_finish_pause_s
        if pause_s:  # TEST HOOK: the window in which the fault suite kills an API process
            log.warning(
                "batch %s: fault_finish_pause_s: pausing %.1f s mid-finish", batch_id, pause_s
            )
            time.sleep(pause_s)


def _end(record: BatchRecord) -> str:
    """Which end of the batch this is: a retried batch ends again, at another `finished_at`."""
    return str(record.get("finished_at") or "")


def _log_failure(batch_id: str | None, error: Exception, wait_s: float) -> None:
    what = f"batch {batch_id}: finish" if batch_id else "finisher"
    if isinstance(error, (redis.RedisError, StorageError)):
        log.warning("%s failed (%s); trying again in %.1f s", what, error, wait_s)
    else:
        log.exception("%s failed unexpectedly; trying again in %.1f s", what, wait_s)


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
