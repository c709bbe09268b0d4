"""The ledger: transitions are compare-and-sets and the batch counters never drift."""

from __future__ import annotations

import random
import time

import pytest
import redis

from producer.dispatcher import Dispatcher
from shared.celery_app import make_celery
from shared.config import Settings
from shared.errors import IllegalTransition, UnknownId
from shared.ids import new_batch_id
from shared.jobs import JobSpec, JobState
from shared.ledger import STATES, Ledger


def _ledger(redis_url: str, **kw: float) -> Ledger:
    return Ledger(
        redis.Redis.from_url(redis_url),
        status_ttl_s=int(kw.get("ttl", 3600)),
        lease_s=kw.get("lease", 30.0),
    )


def _specs(n: int, **overrides: object) -> list[JobSpec]:
    base = {"prompt": "a cat", "model": "tiny", "seed": 1, "width": 64, "height": 64, "steps": 4}
    return [JobSpec.model_validate({**base, **overrides, "prompt": f"a cat {i}"}) for i in range(n)]


def _assert_counters_add_up(ledger: Ledger, batch_id: str) -> dict[str, int]:
    batch = ledger.batch(batch_id)
    assert sum(batch["counts"].values()) == batch["total"], batch
    return batch["counts"]


def test_submitted_jobs_are_queued_and_counted(redis_url: str) -> None:
    ledger = _ledger(redis_url)
    batch_id = new_batch_id()
    ids = ledger.create_batch(batch_id, _specs(5))
    assert [ledger.job(j)["state"] for j in ids] == ["queued"] * 5
    assert _assert_counters_add_up(ledger, batch_id)["queued"] == 5


def test_a_transition_moves_the_counters_with_it(redis_url: str) -> None:
    ledger = _ledger(redis_url)
    batch_id = new_batch_id()
    job_id = ledger.create_batch(batch_id, _specs(2))[0]
    assert ledger.transition(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": "w1"}).applied
    counts = _assert_counters_add_up(ledger, batch_id)
    assert (counts["queued"], counts["running"]) == (1, 1)
    assert ledger.job(job_id)["attempts"] == 1


def test_leaving_a_terminal_state_is_refused(redis_url: str) -> None:
    ledger = _ledger(redis_url)
    batch_id = new_batch_id()
    job_id = ledger.create_batch(batch_id, _specs(1))[0]
    ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING)
    ledger.force(job_id, [JobState.RUNNING], JobState.SUCCEEDED)
    with pytest.raises(IllegalTransition, match="succeeded -> running"):
        ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING)
    result = ledger.transition(job_id, [JobState.RUNNING], JobState.SUCCEEDED)
    assert not result.applied and result.previous == "succeeded"
    assert _assert_counters_add_up(ledger, batch_id)["succeeded"] == 1
    assert ledger.batch(batch_id).get("finished_at")


def test_an_unknown_job_is_reported_as_unknown(redis_url: str) -> None:
    ledger = _ledger(redis_url)
    with pytest.raises(UnknownId):
        ledger.transition(new_batch_id() + "-0", [JobState.QUEUED], JobState.RUNNING)


def test_counters_add_up_after_any_sequence_of_attempted_transitions(redis_url: str) -> None:
    ledger = _ledger(redis_url)
    batch_id = new_batch_id()
    ids = ledger.create_batch(batch_id, _specs(30))
    rng = random.Random(4)
    states = list(JobState)
    for _ in range(400):
        froms = rng.sample(states, rng.randint(1, 3))
        ledger.transition(rng.choice(ids), froms, rng.choice(states))
        _assert_counters_add_up(ledger, batch_id)
    actual = [ledger.job(j)["state"] for j in ids]
    counts = ledger.batch(batch_id)["counts"]
    assert counts == {s: actual.count(s) for s in STATES}


def test_a_chunk_holds_only_compatible_jobs_up_to_max_batch(redis_url: str) -> None:
    ledger = _ledger(redis_url)
    ledger.create_batch(new_batch_id(), _specs(5) + _specs(3, width=128))
    first = ledger.take_chunk("tiny", 4)
    second = ledger.take_chunk("tiny", 4)
    third = ledger.take_chunk("tiny", 4)
    assert first and second and third
    assert (len(first.job_ids), len(second.job_ids), len(third.job_ids)) == (4, 1, 3)
    assert first.compat == second.compat != third.compat
    assert ledger.take_chunk("tiny", 4) is None
    assert ledger.pending_models() == []


def test_a_cancelled_queued_job_is_never_taken(redis_url: str) -> None:
    ledger = _ledger(redis_url)
    batch_id = new_batch_id()
    ids = ledger.create_batch(batch_id, _specs(3))
    assert ledger.request_cancel(ids[1]) == "cancelled"
    chunk = ledger.take_chunk("tiny", 8)
    assert chunk is not None and chunk.job_ids == [ids[0], ids[2]]
    assert _assert_counters_add_up(ledger, batch_id)["cancelled"] == 1


def test_status_records_expire_but_pending_lists_do_not(redis_url: str) -> None:
    ledger = _ledger(redis_url, ttl=120)
    batch_id = new_batch_id()
    job_id = ledger.create_batch(batch_id, _specs(1))[0]
    assert 0 < ledger.redis.ttl(ledger.keys.job(job_id)) <= 120
    assert 0 < ledger.redis.ttl(ledger.keys.batch(batch_id)) <= 120
    pending = ledger.keys.pending(ledger.job(job_id)["compat"])
    assert ledger.redis.ttl(pending) == -1


def test_a_job_whose_worker_died_is_queued_again_then_failed_after_max_attempts(
    redis_url: str,
) -> None:
    # Given a job taken by a worker that then stopped renewing its lease
    settings = Settings(redis_url=redis_url, max_attempts=2, lease_s=0.2, models={"tiny": "/x"})
    ledger = _ledger(redis_url, lease=0.2)
    dispatcher = Dispatcher(settings, ledger, make_celery(settings))
    batch_id = new_batch_id()
    job_id = ledger.create_batch(batch_id, _specs(1))[0]
    for attempt in (1, 2):
        chunk = ledger.take_chunk("tiny", 8)
        assert chunk is not None and chunk.job_ids == [job_id]
        ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": f"w{attempt}"})
        time.sleep(0.3)
        # When the reconciler runs
        dispatcher.reconcile(time.time())
    # Then after the second lost attempt the job failed with the reason
    record = ledger.job(job_id)
    assert record["state"] == "failed"
    assert "stopped renewing its lease" in record["error"]
    assert _assert_counters_add_up(ledger, batch_id)["failed"] == 1


def test_a_chunk_sent_but_never_started_is_sent_again(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, dispatch_timeout_s=0.1, models={"tiny": "/x"})
    ledger = _ledger(redis_url)
    dispatcher = Dispatcher(settings, ledger, make_celery(settings))
    ids = ledger.create_batch(new_batch_id(), _specs(2))
    assert ledger.take_chunk("tiny", 8) is not None  # sent, then the message was lost
    assert ledger.take_chunk("tiny", 8) is None
    time.sleep(0.2)
    assert dispatcher.reconcile(time.time())["resent"] == 2
    chunk = ledger.take_chunk("tiny", 8)
    assert chunk is not None and sorted(chunk.job_ids) == sorted(ids)


def test_a_worker_whose_lease_lapsed_cannot_finish_a_job_another_worker_took(
    redis_url: str,
) -> None:
    # Given a job that worker w1 held, lost, and worker w2 then took
    ledger = _ledger(redis_url)
    batch_id = new_batch_id()
    job_id = ledger.create_batch(batch_id, _specs(1))[0]
    ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": "w1"})
    ledger.force(job_id, [JobState.RUNNING], JobState.QUEUED)
    ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": "w2"})
    # When w1 comes back and tries to hand it back or finish it
    late = ledger.transition(job_id, [JobState.RUNNING], JobState.QUEUED, owner="w1")
    late_finish = ledger.transition(job_id, [JobState.RUNNING], JobState.SUCCEEDED, owner="w1")
    # Then both are refused and w2 still holds it, and can finish it
    assert not late.applied and not late_finish.applied
    assert ledger.job(job_id)["worker"] == "w2"
    assert ledger.transition(job_id, [JobState.RUNNING], JobState.SUCCEEDED, owner="w2").applied
    assert _assert_counters_add_up(ledger, batch_id)["succeeded"] == 1


def test_a_job_cancelled_while_its_worker_died_ends_cancelled_not_requeued(
    redis_url: str,
) -> None:
    # Given a running job whose cancel was requested, and whose worker then died
    settings = Settings(redis_url=redis_url, lease_s=0.2, models={"tiny": "/x"})
    ledger = _ledger(redis_url, lease=0.2)
    dispatcher = Dispatcher(settings, ledger, make_celery(settings))
    batch_id = new_batch_id()
    job_id = ledger.create_batch(batch_id, _specs(1))[0]
    ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": "w1"})
    assert ledger.request_cancel(job_id) == "running"
    time.sleep(0.3)
    # When the reconciler finds its lease expired
    dispatcher.reconcile(time.time())
    # Then the job is cancelled, not sent to render again
    assert ledger.job(job_id)["state"] == "cancelled"
    assert _assert_counters_add_up(ledger, batch_id)["cancelled"] == 1
