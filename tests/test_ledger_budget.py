"""The ledger's budget: nothing is written that cannot be afforded, and nothing is left behind.

A batch is estimated before a byte is written and refused when it would take the ledger past
its budget (`ledger_max_bytes`, or Redis's `maxmemory` less `ledger_headroom`); a write that
fails half way keeps none of the batch; a submit killed half way leaves job records that nothing
points at and that expire on their short TTL.
"""

from __future__ import annotations

import base64
import io
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from PIL import Image
from redis.client import Pipeline

from producer.client import FarmClient
from producer.submit import submit_batch
from shared.config import Settings
from shared.errors import InvalidJob, LedgerFull
from shared.ids import new_batch_id
from shared.jobs import JobSpec
from shared.keys import Keys
from shared.ledger import Ledger, submit
from tests.fixtures_farm import FarmEnv


def _init_image(side: int = 96) -> str:
    """A noise PNG as base64: ~37 KB for 96 px, as big as the issue's init image."""
    rng = random.Random(side)
    pixels = bytes(rng.getrandbits(8) for _ in range(side * side * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def _specs(n: int, *, prompt_chars: int = 40, init_image: str | None = None) -> list[JobSpec]:
    base: dict[str, Any] = {"model": "tiny", "width": 64, "height": 64, "steps": 4}
    if init_image is not None:
        base |= {"init_image": init_image, "width": 96, "height": 96}
    pad = "x" * prompt_chars
    return [
        JobSpec.model_validate({**base, "seed": i, "prompt": f"cat {i} {pad}"}) for i in range(n)
    ]


def _ledger(client: redis.Redis, **kw: Any) -> Ledger:
    return Ledger(client, status_ttl_s=3600, lease_s=30, **kw)


def _memory_usage(client: redis.Redis) -> int:
    return sum(client.memory_usage(key, samples=0) or 0 for key in client.scan_iter(count=1000))


def _job_keys(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter(match=Keys().job("*"), count=1000))


def _settled_keys(client: redis.Redis, quiet_s: float = 1.0) -> set[bytes]:
    """Every key, once the farm's start (worker registry, queue bindings, locks) is done."""
    keys, since, started = set(client.scan_iter(count=1000)), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - started < 15:
        time.sleep(0.1)
        now = set(client.scan_iter(count=1000))
        if now != keys:
            keys, since = now, time.monotonic()
    return keys


@contextmanager
def _maxmemory(client: redis.Redis, room_bytes: int) -> Iterator[None]:
    """The session Redis with `maxmemory` this much above what it holds now (noeviction)."""
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + room_bytes)
    try:
        yield
    finally:
        client.config_set("maxmemory", 0)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.mark.parametrize(
    ("jobs", "prompt_chars", "with_image"),
    [(1000, 40, False), (200, 2000, False), (300, 0, True), (5, 40, False)],
)
def test_the_estimate_is_close_to_what_redis_holds(
    client: redis.Redis, jobs: int, prompt_chars: int, with_image: bool
) -> None:
    # Given a batch, estimated before it is written
    specs = _specs(
        jobs, prompt_chars=prompt_chars, init_image=_init_image() if with_image else None
    )
    ledger = _ledger(client)
    batch_id = new_batch_id()
    plan = ledger.plan_batch(batch_id, specs)

    # When it is written to an empty Redis
    ledger.create_batch(batch_id, specs, plan=plan)

    # Then the estimate is within 30 % of MEMORY USAGE over every key, and not below it by 10 %
    usage = _memory_usage(client)
    assert 0.9 * usage <= plan.estimate_bytes <= 1.3 * usage, (plan.estimate_bytes, usage)


def test_a_committed_batch_gives_its_jobs_the_full_ttl(client: redis.Redis) -> None:
    # Given a ledger whose uncommitted records live 60 s
    ledger = _ledger(client, uncommitted_ttl_s=60)

    # When a batch is written
    job_ids = ledger.create_batch(new_batch_id(), _specs(3))

    # Then its job records carry the status TTL, not the short one
    assert all(client.ttl(Keys().job(j)) > 3000 for j in job_ids)


def test_an_oversized_batch_is_refused_and_a_small_one_after_it_renders(
    farm_env: FarmEnv, serve_api: Any
) -> None:
    # Given a farm with a worker, on a Redis with 2 MB of room left (noeviction)
    client = redis.Redis.from_url(farm_env.settings.redis_url)
    farm_env.start_worker()
    api_url = serve_api(farm_env.settings)
    farm_env.wait_for_workers(1)
    with _maxmemory(client, 2_000_000), FarmClient(api_url) as farm:
        keys_before = _settled_keys(client)

        # When 3,000 prompts sharing a 37 KB init image in `defaults` arrive: the image is stored
        # once and each job holds its reference (~1.5 KB a job, ~4.5 MB in Redis)
        defaults = {"init_image": _init_image(), "width": 96, "height": 96, "steps": 2}
        with pytest.raises(InvalidJob) as refused:  # the client reads a 413 as InvalidJob
            farm.submit(prompts=[f"a cat {i}" for i in range(3000)], defaults=defaults)

        # Then they are refused with a message that names the size and the budget
        message = str(refused.value)
        assert "would take about" in message and "budget of" in message, message
        assert "maxmemory" in message and "jobs a batch" in message, message
        # And nothing was written
        assert client.dbsize() == len(keys_before), set(client.scan_iter()) ^ keys_before
        assert _job_keys(client) == []

        # And a small batch right after is accepted and renders
        submitted = farm.submit(
            prompts=["a lighthouse"], defaults={"width": 64, "height": 64, "steps": 2}
        )
        status = farm.wait(submitted["batch_id"], poll_s=0.2, timeout_s=120)
    assert status["counts"]["succeeded"] == 1, status
    client.close()


def test_an_oversized_batch_is_a_413_naming_the_limit(start_api: Any) -> None:
    # Given an API whose ledger may hold 1 MB
    api = start_api(ledger_max_bytes=1_000_000)

    # When 2,000 jobs (~2.5 MB in Redis) are posted
    jobs = [{"prompt": f"a cat {i}", "width": 64, "height": 64} for i in range(2000)]
    response = api.ndjson(jobs)

    # Then the answer is a 413 naming the size and the setting, and no job record exists
    assert response.status_code == 413, response.text
    assert "SDFARM_LEDGER_MAX_BYTES" in response.json()["error"]
    assert "budget of 1.0 MB" in response.json()["error"]
    assert _job_keys(api.ledger.redis) == []


def test_a_batch_over_the_room_left_is_a_507_and_nothing_is_written(
    start_api: Any, client: redis.Redis
) -> None:
    # Given an API whose ledger budget has ~300 KB left beyond what Redis holds now
    used = int(client.info("memory")["used_memory"])
    api = start_api(ledger_max_bytes=used + 300_000)

    # When 500 jobs (~600 KB) are posted: within the budget, not within the room left
    response = api.ndjson([{"prompt": f"a cat {i}"} for i in range(500)])

    # Then the answer is a 507 that says how much is free, and nothing was written
    assert response.status_code == 507, response.text
    assert "free of its budget" in response.json()["error"]
    assert _job_keys(client) == []


def test_submits_add_up_against_the_budget(client: redis.Redis, redis_url: str) -> None:
    # Given a budget with room for one such batch beyond what Redis holds now
    ledger = _ledger(client)
    jobs = [{"prompt": f"a cat {i}"} for i in range(300)]
    need = ledger.plan_batch(new_batch_id(), _specs(300)).estimate_bytes
    used = int(client.info("memory")["used_memory"])
    budget = used + need * 3 // 2
    settings = Settings(redis_url=redis_url, models={"tiny": "/x"}, ledger_max_bytes=budget)

    # When the same batch is submitted twice
    submit_batch(ledger, settings, jobs)

    # Then the second is refused as the ledger being full, not as too large
    with pytest.raises(LedgerFull, match="needs about"):
        submit_batch(ledger, settings, jobs)


def test_redis_filling_up_mid_write_leaves_no_job_record(client: redis.Redis) -> None:
    # Given a Redis with 2 MB of room and a ledger that does not check its budget
    ledger = _ledger(client)
    specs = _specs(5000)  # ~7 MB: Redis refuses writes part way through the slices

    # When the batch is written
    with _maxmemory(client, 2_000_000):
        keys_before = client.dbsize()
        with pytest.raises(LedgerFull, match="ran out of memory"):
            ledger.create_batch(new_batch_id(), specs)

        # Then the records written before Redis filled up are gone
        assert _job_keys(client) == []
        assert client.dbsize() == keys_before

        # And Redis has room again: a small batch is accepted
        assert len(ledger.create_batch(new_batch_id(), _specs(2))) == 2


def test_a_connection_lost_after_the_first_slice_leaves_no_job_record(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a connection that drops after the first slice of job records is written
    calls = {"n": 0}
    real_execute = Pipeline.execute

    def flaky(self: Pipeline, raise_on_error: bool = True) -> list[Any]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise redis.ConnectionError("connection lost (test)")
        return real_execute(self, raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", flaky)
    ledger = _ledger(client)

    # When a 3,000-job batch (two slices) is written
    batch_id = new_batch_id()
    with pytest.raises(redis.ConnectionError):
        ledger.create_batch(batch_id, _specs(3000))

    # Then no job record and no batch record is left
    assert _job_keys(client) == []
    assert not client.exists(Keys().batch(batch_id))


def test_a_submit_killed_before_its_commit_leaves_records_that_expire(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a ledger whose uncommitted records live 2 s, and a process killed before the commit
    def killed(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("killed (test)")

    monkeypatch.setattr(submit, "_commit", killed)
    ledger = _ledger(client, uncommitted_ttl_s=2)

    # When a batch is written
    with pytest.raises(SystemExit):
        ledger.create_batch(new_batch_id(), _specs(20))

    # Then its job records exist only on their short TTL, and soon not at all
    orphans = _job_keys(client)
    assert len(orphans) == 20 and all(client.ttl(k) <= 2 for k in orphans)
    deadline = time.monotonic() + 10
    while _job_keys(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _job_keys(client) == []


def test_a_commit_refused_for_memory_leaves_no_job_record(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a Redis that fills up after the job records are written, before their commit
    real_commit = submit._commit

    def full_then_commit(*args: Any, **kwargs: Any) -> None:
        client.config_set("maxmemory", 1)
        real_commit(*args, **kwargs)

    monkeypatch.setattr(submit, "_commit", full_then_commit)
    ledger = _ledger(client)

    # When a batch is written
    batch_id = new_batch_id()
    try:
        with pytest.raises(LedgerFull):
            ledger.create_batch(batch_id, _specs(50))
    finally:
        client.config_set("maxmemory", 0)

    # Then neither its batch record nor any of its job records is left
    assert _job_keys(client) == []
    assert not client.exists(Keys().batch(batch_id))
