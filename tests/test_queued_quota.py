"""A tenant's `max_queued_jobs`: its jobs not yet final are bounded, counted exactly by the
ledger (up at submit, down at each job's first final state, up again on a retry), and a submit
that would pass the bound is refused: 429 with `Retry-After`, or 422 when the batch alone is over.

Real Redis and the real ledger for the count; the real API for the refusals.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from producer.dispatcher import Dispatcher
from shared.celery_app import make_celery
from shared.config import Settings
from shared.errors import FailureReason, RateLimited
from shared.ids import new_batch_id
from shared.jobs import JobSpec, JobState
from shared.ledger import Ledger
from tests.fixtures_api import Api
from tests.test_tenants import SMALL, _client, _digest

SPEC = {"prompt": "a cat", "model": "tiny", "seed": 1, "width": 64, "height": 64, "steps": 4}
ALPHA_KEY = "queue-alpha-" + "a" * 24
BETA_KEY = "queue-beta-" + "b" * 24


def _ledger(redis_url: str, lease_s: float = 30.0) -> Ledger:
    return Ledger(redis.Redis.from_url(redis_url), status_ttl_s=3600, lease_s=lease_s)


def _specs(n: int) -> list[JobSpec]:
    return [JobSpec.model_validate(SPEC | {"prompt": f"a cat {i}"}) for i in range(n)]


def _not_final(ledger: Ledger, batch_ids: list[str]) -> int:
    """The tenant's jobs queued or running, counted from the batches' own counters."""
    return sum(
        ledger.batch(b)["counts"]["queued"] + ledger.batch(b)["counts"]["running"]
        for b in batch_ids
    )


def test_the_open_count_follows_every_way_a_job_can_end_and_come_back(redis_url: str) -> None:
    # Given a tenant's 10-job batch
    ledger = _ledger(redis_url, lease_s=0.2)
    settings = Settings(redis_url=redis_url, max_attempts=1, lease_s=0.2, models={"tiny": "/x"})
    dispatcher = Dispatcher(settings, ledger, make_celery(settings), weights={})
    batch_id = new_batch_id()
    ids = ledger.create_batch(batch_id, _specs(10), tenant="alpha")
    steps = [("submitted", ledger.open_jobs.count("alpha"))]
    running = [JobState.RUNNING]
    # When jobs run and succeed, a redelivery tries to finish one again, one is cancelled while
    # queued, one fails, one is re-queued by the farm and one's worker dies for good
    for job_id in ids[:5]:
        ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": "w1"})
    for job_id in ids[:3]:
        ledger.force(job_id, running, JobState.SUCCEEDED)
    assert not ledger.transition(ids[0], running, JobState.SUCCEEDED).applied  # a redelivery
    assert not ledger.transition(ids[0], [JobState.QUEUED], JobState.CANCELLED).applied
    steps.append(("3 succeeded, one finished twice", ledger.open_jobs.count("alpha")))
    ledger.request_cancel(ids[9])
    ledger.request_cancel(ids[9])
    steps.append(("1 cancelled twice", ledger.open_jobs.count("alpha")))
    ledger.requeue_or_fail(ids[3], "boom", charge_attempt=True, max_attempts=1)
    ledger.requeue_or_fail(ids[4], "storage down", charge_attempt=False, max_attempts=1)
    steps.append(("1 failed, 1 re-queued", ledger.open_jobs.count("alpha")))
    ledger.force(ids[5], [JobState.QUEUED], JobState.RUNNING, {"worker": "w2"})
    time.sleep(0.3)
    dispatcher.reconcile()  # its lease expired: failed after its one attempt
    steps.append(("1 worker lost", ledger.open_jobs.count("alpha")))
    assert ledger.job(ids[5])["reason"] == FailureReason.WORKER_LOST.value
    ledger.retry_batch(batch_id)
    steps.append(("failed and cancelled retried", ledger.open_jobs.count("alpha")))
    ledger.cancel_batch(batch_id)
    ledger.cancel_batch(batch_id)
    steps.append(("batch cancelled twice", ledger.open_jobs.count("alpha")))
    # Then at every step the count is exactly the batch's jobs queued or running
    print(f"\nopen jobs: {steps}")
    assert [count for _, count in steps] == [10, 7, 6, 5, 4, 7, 0]
    assert ledger.open_jobs.count("alpha") == _not_final(ledger, [batch_id])


def test_a_batch_over_max_open_is_refused_naming_the_numbers_and_writes_nothing(
    redis_url: str,
) -> None:
    # Given a tenant with 4 jobs not yet final and a bound of 6
    ledger = _ledger(redis_url)
    ledger.create_batch(new_batch_id(), _specs(4), tenant="alpha", max_open=6)
    # When it submits 3 more
    refused_id = new_batch_id()
    with pytest.raises(RateLimited) as refused:
        ledger.create_batch(refused_id, _specs(3), tenant="alpha", max_open=6)
    # Then it is refused with the limit, the count and the batch's size, and nothing is kept
    message = str(refused.value)
    assert "max_queued_jobs is 6" in message and "it has 4" in message, message
    assert "this batch adds 3" in message and refused.value.retry_after_s > 0
    assert not ledger.redis.exists(ledger.keys.batch(refused_id))
    assert not ledger.redis.exists(ledger.keys.job(f"{refused_id}-0"))
    assert ledger.open_jobs.count("alpha") == 4
    # And 2 more still fit, and another tenant is not touched
    ledger.create_batch(new_batch_id(), _specs(2), tenant="alpha", max_open=6)
    ledger.create_batch(new_batch_id(), _specs(5), tenant="beta", max_open=6)
    assert (ledger.open_jobs.count("alpha"), ledger.open_jobs.count("beta")) == (6, 5)


def test_concurrent_submits_cannot_pass_the_bound_together(redis_url: str) -> None:
    # Given a bound of 10 and eight submits of 3 jobs at once, from eight connections
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def submit() -> None:
        ledger = _ledger(redis_url)
        start.wait()
        try:
            ledger.create_batch(new_batch_id(), _specs(3), tenant="alpha", max_open=10)
            outcomes.append("accepted")
        except RateLimited:
            outcomes.append("refused")
        finally:
            ledger.close()

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # Then exactly three were accepted: 9 jobs, and a fourth would have made 12
    assert sorted(outcomes) == ["accepted"] * 3 + ["refused"] * 5
    assert _ledger(redis_url).open_jobs.count("alpha") == 9


@dataclass
class Bounded:
    api: Api
    alpha: httpx.Client
    beta: httpx.Client


@pytest.fixture
def bounded(start_api: Callable[..., Api], tmp_path: Path) -> Iterator[Bounded]:
    path = tmp_path / "tenants.toml"
    path.write_text(
        f"""
[tenants.alpha]
keys_sha256 = ["{_digest(ALPHA_KEY)}"]
max_queued_jobs = 5

[tenants.beta]
keys_sha256 = ["{_digest(BETA_KEY)}"]
"""
    )
    api = start_api(api_keys=[], tenants_file=path)
    alpha, beta = _client(api.url, ALPHA_KEY), _client(api.url, BETA_KEY)
    yield Bounded(api, alpha, beta)
    alpha.close()
    beta.close()


def _post(client: httpx.Client, prompts: int) -> httpx.Response:
    body = {"prompts": [f"a lighthouse {i}" for i in range(prompts)], "defaults": SMALL}
    return client.post("/v1/batches", json=body)


def test_the_api_refuses_past_max_queued_jobs_with_429_then_accepts_as_jobs_end(
    bounded: Bounded,
) -> None:
    # Given alpha (max_queued_jobs 5) with 3 jobs queued (no worker: they stay queued)
    first = _post(bounded.alpha, 3)
    assert first.status_code == 201, first.text
    # When it submits 3 more
    refused = _post(bounded.alpha, 3)
    # Then it is a 429 naming the limit, its count and the batch's size, with Retry-After
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert "tenant 'alpha' may have at most 5 jobs queued or running" in error
    assert "it has 3 and this batch adds 3" in error
    assert int(refused.headers["Retry-After"]) > 0
    # And beta, with no bound, is not touched
    assert _post(bounded.beta, 8).status_code == 201
    # When alpha's first batch is cancelled, Then the same submit is accepted
    batch_id = first.json()["batch_id"]
    assert bounded.alpha.delete(f"/v1/batches/{batch_id}").status_code == 200
    assert _post(bounded.alpha, 3).status_code == 201


def test_a_batch_bigger_than_max_queued_jobs_alone_is_422(bounded: Bounded) -> None:
    # When alpha sends 6 jobs in one batch, Then it can never fit: 422, naming the limit
    response = _post(bounded.alpha, 6)
    assert response.status_code == 422, response.text
    assert "max_queued_jobs is 5" in response.json()["error"]
    assert "this batch alone has 6" in response.json()["error"]
    assert bounded.api.ledger.open_jobs.count("alpha") == 0
