"""The dispatcher: keeps each model's Celery queue topped up from the ledger, and reconciles.

One dispatcher is active across the farm at a time (a lease lock in Redis); every `sdfarm api`
runs one that takes over when the active one stops. It wakes when work arrives (a push on the
ledger's wake list), so a lone job is sent within milliseconds when a worker is free.

It is also the reconciler: jobs whose lease expired (dead worker) go back to `queued`, or to
`failed` after `max_attempts`; chunks sent but not started within `dispatch_timeout_s` are sent
again. Duplicated deliveries are harmless: a terminal or running job is skipped on entry.

What goes next is the ledger's dispatch policy (`shared.ledger.pending`): priority classes
first, then tenants by their share `weight` (the tenants file), then each tenant's batches in
turn, then the order within a batch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Mapping

import redis
from celery import Celery

from producer.tenants import load_tenants
from shared.celery_app import RENDER_CHUNK, model_queue
from shared.config import Settings
from shared.errors import FailureReason, UnknownId
from shared.jobs import JobState
from shared.ledger import Ledger

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.25  # longest sleep between ticks when nothing wakes the dispatcher


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
        weights: Mapping[str, float] | None = None,
    ) -> None:
        """`weights`: each tenant's share weight; None reads them from the settings' tenants."""
        self.settings = settings
        self.ledger = ledger
        self.celery = celery
        self.node_id = uuid.uuid4().hex[:12]
        self.lock_ttl_s = lock_ttl_s
        self.reconcile_every_s = reconcile_every_s
        self._last_reconcile = 0.0
        self.active = False
        self.hold_until: float | None = None  # when the earliest held group is due (top_up)
        self.weights = dict(weights if weights is not None else load_tenants(settings).weights())

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Dispatch while holding the lock, else wait to take over; return when `stop` is set."""
        while not stop.is_set():
            try:
                self.active = self._hold_lock()
                if self.active:
                    self.tick()
                    # Sleep until new work or a finished chunk pushes the wake list, or until a
                    # group held for more jobs is due.
                    self.ledger.wait_for_wake(self._sleep_s())
                else:
                    stop.wait(self.lock_ttl_s / 3)
            except redis.RedisError as e:
                log.warning("dispatcher %s: redis unavailable (%s); retrying", self.node_id, e)
                stop.wait(1.0)
        if self.active:
            with contextlib.suppress(redis.RedisError):  # the lock expires on its own anyway
                self.ledger.loops.release_dispatch_lock(self.node_id)

    def _hold_lock(self) -> bool:
        """Renew the farm's dispatch lock, or take it when it is free; True while we hold it."""
        held = self.ledger.loops.hold_dispatch_lock(self.node_id, self.lock_ttl_s)
        if held and not self.active:
            log.info("dispatcher %s is now the active dispatcher", self.node_id)
        return held

    def tick(self) -> int:
        """One round: reconcile when due, then top up every model's queue. Returns chunks sent."""
        now = time.time()
        if now - self._last_reconcile >= self.reconcile_every_s:
            self._last_reconcile = now
            self.reconcile()
        return self.top_up()

    # -- dispatch -------------------------------------------------------------------------------

    def top_up(self) -> int:
        """Fill each model's queue up to its target from the ledger; return the chunks sent.

        The target is `queue_chunks_per_worker` per live worker serving the model, so the broker
        holds only a little work and the order of everything else is decided here, at the last
        moment (priority, tenants' shares, turns, grouping: `shared.ledger.pending`); shares
        are kept per model. A model no live worker serves gets nothing sent: its jobs wait in
        the ledger, where the API reports why.
        """
        sent = 0
        self.hold_until = None
        wait_s = self.settings.batch_wait_ms / 1000
        workers = self.ledger.workers.live()
        for model in self.ledger.pending_models():
            serving = sum(1 for w in workers if model in w.get("models", []))
            target = self.settings.queue_chunks_per_worker * serving
            depth = self.ledger.stats.broker_depth(model) if target else 0
            while depth < target:
                take = self.ledger.take(
                    model, self.settings.max_batch, wait_s=wait_s, weights=self.weights
                )
                if take.chunk is None:
                    if take.hold_until is not None:
                        self.hold_until = min(self.hold_until or take.hold_until, take.hold_until)
                    break
                self.send(take.chunk.model, take.chunk.job_ids)
                depth += 1
                sent += 1
        return sent

    def _sleep_s(self) -> float:
        """How long the loop may block on the wake list: until the next held group is due."""
        if self.hold_until is None:
            return _IDLE_WAIT_S
        # BLPOP reads 0 as "forever"; a group already due gets the shortest real wait.
        return min(_IDLE_WAIT_S, max(0.001, self.hold_until - time.time()))

    def send(self, model: str, job_ids: list[str]) -> None:
        self.celery.send_task(
            RENDER_CHUNK, args=[job_ids], kwargs={"model": model}, queue=model_queue(model)
        )
        log.info(
            "sent chunk of %d jobs to %s (first %s)", len(job_ids), model_queue(model), job_ids[0]
        )

    # -- reconcile ------------------------------------------------------------------------------

    def reconcile(self, now: float | None = None) -> dict[str, int]:
        """Recover what the broker or a worker lost; the ledger says what that is.

        - A `running` job whose lease expired belongs to a worker that died or lost Redis: it
          goes back to `queued` (sent again by `top_up`), or to `failed` once it has used
          `max_attempts`, with the reason of its last attempt (`Ledger.requeue_or_fail`, the
          policy the workers use too). The move is a compare-and-set on the owner it saw and on
          the lease having expired, so a renewal that came in meanwhile keeps the job rendering.
        - A job sent to a queue but not started within `dispatch_timeout_s` was lost on the way
          (a broker that dropped its messages, a queue key deleted): it is pushed back to pending
          and sent again. If the first message turns up after all, the job is no longer `queued`
          by then and that delivery does nothing.

        Leases are judged by Redis's clock; `now` (this host's clock) is for tools and tests that
        look ahead. One job's trouble (its record expired, say) never stops the others' recovery.
        """
        counts = {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0, "dropped": 0}
        for job_id in self.ledger.expired_leases(now):
            counts[self._recover_expired(job_id)] += 1
        for job_id in self.ledger.stale_inflight(self.settings.dispatch_timeout_s):
            counts[self._resend_stale(job_id)] += 1
        if any(counts.values()):
            log.info("reconciled: %s", ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        return counts

    def _resend_stale(self, job_id: str) -> str:
        try:
            result = self.ledger.transition(job_id, [JobState.QUEUED], JobState.QUEUED)
        except UnknownId:  # its record expired: nothing left to send
            self.ledger.forget_inflight(job_id)
            return "dropped"
        if not result.applied:  # started, or ended, since: nothing to recover
            self.ledger.forget_inflight(job_id)
            return "dropped"
        log.warning(
            "job %s: sent but not started within %.0f s; sending again",
            job_id,
            self.settings.dispatch_timeout_s,
        )
        return "resent"

    def _recover_expired(self, job_id: str) -> str:
        try:
            record = self.ledger.job(job_id)
        except UnknownId:  # its record expired while leased: forget the lease
            self.ledger.forget_lease(job_id)
            return "dropped"
        reason = f"worker {record.worker or '?'} stopped renewing its lease (lost or killed)"
        try:
            state = self.ledger.requeue_or_fail(
                job_id,
                reason,
                charge_attempt=True,
                max_attempts=self.settings.max_attempts,
                owner=record.worker,
                lease_expired=True,
                code=FailureReason.WORKER_LOST,
            )
        except UnknownId:  # expired between the two reads
            self.ledger.forget_lease(job_id)
            return "dropped"
        if not state:
            # Refused: renewed since we looked (a live worker: leave it), or moved on by itself.
            if record.state is not JobState.RUNNING:
                self.ledger.forget_lease(job_id)
            return "dropped"
        outcome = "requeued" if state == JobState.QUEUED else state
        log.warning("job %s: %s; %s", job_id, reason, outcome)
        return outcome
