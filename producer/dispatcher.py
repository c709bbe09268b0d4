"""The dispatcher: keeps each model's Celery queue topped up from the ledger, and reconciles.

One dispatcher is active across the farm at a time (a lease lock in Redis); every `sdfarm api`
runs one that takes over when the active one stops. It wakes when work arrives (a push on the
ledger's wake list), so a lone job is sent within milliseconds when a worker is free.

It is also the reconciler: jobs whose lease expired (dead worker) go back to `queued`, or to
`failed` after `max_attempts`; chunks sent but not started within `dispatch_timeout_s` are sent
again. Duplicated deliveries are harmless: a terminal or running job is skipped on entry.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Any

import redis
from celery import Celery

from shared.celery_app import RENDER_CHUNK, model_queue
from shared.config import Settings
from shared.jobs import JobState
from shared.ledger import Ledger
from shared.registry import live_workers

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

# Renew the lock only if we still own it, so a paused dispatcher cannot steal it back.
_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Dispatcher:
    """Moves queued jobs from the ledger to Celery queues, a few chunks ahead of the workers."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        celery: Celery,
        *,
        lock_ttl_s: float = 5.0,
        reconcile_every_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.redis: redis.Redis = ledger.redis
        self.celery = celery
        self.node_id = uuid.uuid4().hex[:12]
        self.lock_ttl_s = lock_ttl_s
        self.reconcile_every_s = reconcile_every_s
        self._renew_lock = self.redis.register_script(_RENEW_LOCK)
        self._release_lock = self.redis.register_script(_RELEASE_LOCK)
        self._last_reconcile = 0.0
        self.active = False

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Dispatch while holding the lock, else wait to take over; return when `stop` is set."""
        key = self.ledger.keys.dispatcher_lock()
        while not stop.is_set():
            try:
                self.active = self._hold_lock(key)
                if self.active:
                    self.tick()
                    # Sleep until new work or a finished chunk pushes the wake list.
                    self.redis.blpop([self.ledger.keys.wake()], timeout=0.25)
                else:
                    stop.wait(self.lock_ttl_s / 3)
            except redis.RedisError as e:
                log.warning("dispatcher %s: redis unavailable (%s); retrying", self.node_id, e)
                stop.wait(1.0)
        if self.active:
            with contextlib.suppress(redis.RedisError):  # the lock expires on its own anyway
                self._release_lock(keys=[key], args=[self.node_id])

    def _hold_lock(self, key: str) -> bool:
        ttl_ms = int(self.lock_ttl_s * 1000)
        if self._renew_lock(keys=[key], args=[self.node_id, ttl_ms]):
            return True
        taken = bool(self.redis.set(key, self.node_id, nx=True, px=ttl_ms))
        if taken:
            log.info("dispatcher %s is now the active dispatcher", self.node_id)
        return taken

    def tick(self) -> int:
        """One round: reconcile when due, then top up every model's queue. Returns chunks sent."""
        now = time.time()
        if now - self._last_reconcile >= self.reconcile_every_s:
            self._last_reconcile = now
            self.reconcile(now)
        return self.top_up()

    # -- dispatch -------------------------------------------------------------------------------

    def top_up(self) -> int:
        sent = 0
        workers = live_workers(self.redis, self.ledger.keys)
        for model in self.ledger.pending_models():
            serving = sum(1 for w in workers if model in w.get("models", []))
            target = self.settings.queue_chunks_per_worker * max(1, serving)
            depth = int(self.redis.llen(model_queue(model)))
            while depth < target:
                chunk = self.ledger.take_chunk(model, self.settings.max_batch)
                if chunk is None:
                    break
                self.send(chunk.model, chunk.job_ids)
                depth += 1
                sent += 1
        return sent

    def send(self, model: str, job_ids: list[str]) -> None:
        self.celery.send_task(
            RENDER_CHUNK, args=[job_ids], kwargs={"model": model}, queue=model_queue(model)
        )
        log.info(
            "sent chunk of %d jobs to %s (first %s)", len(job_ids), model_queue(model), job_ids[0]
        )

    # -- reconcile ------------------------------------------------------------------------------

    def reconcile(self, now: float) -> dict[str, int]:
        """Recover jobs of dead workers and chunks lost on the way to a worker."""
        counts = {"requeued": 0, "failed": 0, "resent": 0}
        for job_id in self.ledger.expired_leases(now):
            counts[self._recover_expired(job_id)] += 1
        older = now - self.settings.dispatch_timeout_s
        for job_id in self.ledger.stale_inflight(older):
            result = self.ledger.transition(job_id, [JobState.QUEUED], JobState.QUEUED)
            if result.applied:
                counts["resent"] += 1
                log.warning(
                    "job %s: sent but not started in %.0fs; sending again",
                    job_id,
                    self.settings.dispatch_timeout_s,
                )
            else:
                self.redis.zrem(self.ledger.keys.inflight(), job_id)
        return counts

    def _recover_expired(self, job_id: str) -> str:
        record: dict[str, Any] = self.ledger.job(job_id)
        worker = record.get("worker", "?")
        reason = f"worker {worker} stopped renewing its lease (lost or killed)"
        if record["attempts"] >= self.settings.max_attempts:
            result = self.ledger.transition(
                job_id,
                [JobState.RUNNING],
                JobState.FAILED,
                {
                    "error": f"{reason}; gave up after {record['attempts']} attempts",
                    "finished_at": time.time(),
                },
            )
            outcome = "failed"
        else:
            result = self.ledger.transition(
                job_id, [JobState.RUNNING], JobState.QUEUED, {"last_error": reason}
            )
            outcome = "requeued"
        if result.applied:
            log.warning("job %s: %s; %s", job_id, reason, outcome)
        return outcome
