"""Leases and waits are judged by Redis's clock, and the reconciler re-queues only what it should.

A host's clock is shifted by patching `time.time` for the calls that host makes: the ledger must
not care, since every lease, arrival time and batching wait is taken from Redis's `TIME`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from producer.dispatcher import Dispatcher
from shared.celery_app import make_celery
from shared.config import Settings
from shared.errors import FailureReason
from shared.ids import new_batch_id
from shared.jobs import JobSpec, JobState
from shared.ledger import Ledger

SKEW_S = 300.0  # five minutes


@contextmanager
def clock_off_by(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Iterator[None]:
    """This process's clock reads `seconds` off while the block runs (another host's clock)."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)
    try:
        yield
    finally:
        monkeypatch.setattr(time, "time", real)


def _ledger(redis_url: str, lease_s: float) -> Ledger:
    return Ledger(redis.Redis.from_url(redis_url), status_ttl_s=3600, lease_s=lease_s)


def _job(ledger: Ledger) -> str:
    spec = JobSpec(prompt="a fox", model="tiny", width=64, height=64, steps=2, seed=1)
    return ledger.create_batch(new_batch_id(), [spec])[0]


def _dispatcher(redis_url: str, ledger: Ledger, lease_s: float) -> Dispatcher:
    settings = Settings(redis_url=redis_url, lease_s=lease_s, models={"tiny": "/x"})
    return Dispatcher(settings, ledger, make_celery(settings))


def _claim(ledger: Ledger, job_id: str, worker: str) -> None:
    ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": worker})


def test_a_worker_whose_clock_is_five_minutes_behind_keeps_its_jobs(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker whose clock is five minutes behind, rendering a job and renewing its lease
    ledger = _ledger(redis_url, lease_s=5)
    job_id = _job(ledger)
    with clock_off_by(monkeypatch, -SKEW_S):
        _claim(ledger, job_id, "w-behind")
        ledger.renew_leases("w-behind", [job_id])
    # When the reconciler runs on a host with the right time
    counts = _dispatcher(redis_url, ledger, lease_s=5).reconcile()
    # Then the job is still the worker's, rendering
    assert counts["requeued"] == 0
    record = ledger.job(job_id)
    assert (record["state"], record["worker"]) == ("running", "w-behind")


def test_a_worker_whose_clock_is_five_minutes_ahead_does_not_delay_recovery(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker whose clock is five minutes ahead, which claimed a job and then died
    ledger = _ledger(redis_url, lease_s=0.3)
    job_id = _job(ledger)
    with clock_off_by(monkeypatch, SKEW_S):
        _claim(ledger, job_id, "w-ahead")
        ledger.renew_leases("w-ahead", [job_id])
    # When its lease (0.3 s) has run out by any honest clock, and the reconciler runs
    time.sleep(0.5)
    counts = _dispatcher(redis_url, ledger, lease_s=0.3).reconcile()
    # Then the job is queued again at once, not five minutes later
    assert counts["requeued"] == 1
    assert ledger.job(job_id)["state"] == "queued"


def test_a_reconciler_whose_clock_is_ahead_cannot_requeue_a_job_a_live_worker_renders(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job a live worker renders, its lease just renewed for 5 s
    ledger = _ledger(redis_url, lease_s=5)
    job_id = _job(ledger)
    _claim(ledger, job_id, "w-live")
    ledger.renew_leases("w-live", [job_id])
    # When a dispatcher whose clock is five minutes ahead reconciles
    with clock_off_by(monkeypatch, SKEW_S):
        counts = _dispatcher(redis_url, ledger, lease_s=5).reconcile(time.time())
    # Then it saw the lease as expired by its own clock, but the compare-and-set on Redis's
    # clock refused: the job stays with its worker, and no attempt was charged
    assert counts["requeued"] == 0 and counts["failed"] == 0
    record = ledger.job(job_id)
    assert (record["state"], record["worker"], record["attempts"]) == ("running", "w-live", 1)


def test_a_lease_renewed_after_the_reconciler_looked_is_not_requeued(redis_url: str) -> None:
    # Given a job whose lease expired, and a reconciler that has just listed it as expired
    ledger = _ledger(redis_url, lease_s=0.2)
    job_id = _job(ledger)
    _claim(ledger, job_id, "w-slow")
    time.sleep(0.3)
    assert ledger.expired_leases() == [job_id]
    # When the worker's late renewal lands before the reconciler moves the job
    ledger.renew_leases("w-slow", [job_id])
    state = ledger.requeue_or_fail(
        job_id,
        "worker w-slow stopped renewing its lease",
        charge_attempt=True,
        max_attempts=3,
        owner="w-slow",
        lease_expired=True,
        code=FailureReason.WORKER_LOST,
    )
    # Then the move is refused and the job keeps rendering where it is
    assert state == ""
    assert ledger.job(job_id)["state"] == "running"


def test_a_reconciler_cannot_requeue_a_job_another_worker_took_since_it_looked(
    redis_url: str,
) -> None:
    # Given a job whose worker w1 died, re-queued by one dispatcher and taken by worker w2
    ledger = _ledger(redis_url, lease_s=0.2)
    job_id = _job(ledger)
    _claim(ledger, job_id, "w1")
    time.sleep(0.3)
    seen = ledger.job(job_id)  # what a second, overlapping dispatcher read
    assert ledger.requeue_or_fail(
        job_id, "w1 lost", charge_attempt=True, max_attempts=3, owner="w1", lease_expired=True
    )
    _claim(ledger, job_id, "w2")
    time.sleep(0.3)  # w2's lease has lapsed too, but w2 is not the owner the second one saw
    # When the second dispatcher acts on its stale read
    state = ledger.requeue_or_fail(
        job_id,
        "w1 lost",
        charge_attempt=True,
        max_attempts=3,
        owner=seen.worker,
        lease_expired=True,
    )
    # Then it is refused: only a reconciler that saw w2 may recover w2's job
    assert state == ""
    assert ledger.job(job_id)["worker"] == "w2"


def test_a_batch_from_a_host_whose_clock_is_behind_still_waits_to_be_grouped(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an API host whose clock is five minutes behind, submitting one job
    ledger = _ledger(redis_url, lease_s=5)
    with clock_off_by(monkeypatch, -SKEW_S):
        _job(ledger)
    # When the dispatcher takes with a 10 s batching wait
    take = ledger.take("tiny", 8, wait_s=10.0)
    # Then the lone job is held for more jobs (its arrival is Redis's now, not five minutes ago)
    assert take.chunk is None
    assert take.hold_until is not None and 9.0 < take.hold_until - time.time() <= 10.0


def test_a_running_job_whose_cancel_was_requested_is_never_requeued(redis_url: str) -> None:
    # Given a running job whose cancel was requested
    ledger = _ledger(redis_url, lease_s=5)
    job_id = _job(ledger)
    _claim(ledger, job_id, "w1")
    assert ledger.request_cancel(job_id) == "running"
    # When its worker hands it back (no attempt charged), as on shutdown or a store outage
    state = ledger.requeue_or_fail(
        job_id, "the worker shut down", charge_attempt=False, max_attempts=3, owner="w1"
    )
    # Then it ends cancelled, and a plain move back to queued would have done the same
    assert state == "cancelled"
    assert ledger.job(job_id)["state"] == "cancelled"
    other = _job(ledger)
    _claim(ledger, other, "w1")
    ledger.request_cancel(other)
    moved = ledger.transition(other, [JobState.RUNNING], JobState.QUEUED, owner="w1")
    assert moved.applied and moved.state == "cancelled"
