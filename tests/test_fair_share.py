"""Fair share between tenants: the dispatcher takes turns between tenants by weight first, then
between a tenant's batches, so splitting work into many batches wins a tenant nothing.

Real Redis, the real ledger and dispatcher; a worker's registry heartbeat stands in for a worker,
and the test takes chunks off the model's Celery queue the way a worker would, so the measured
thing is the order the dispatcher sent the jobs in. `SDFARM_FAIR_SHARE_JOBS=1000` runs the
hostile-tenant story at full size (1,000 one-job batches beside one 1,000-job batch).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
from pathlib import Path

import redis

from producer.dispatcher import Dispatcher
from shared.celery_app import make_celery, model_queue
from shared.config import Settings
from shared.ids import new_batch_id
from shared.jobs import JobSpec
from shared.ledger import Ledger
from shared.ledger.workers import publish_heartbeat

SPEC = {"prompt": "a lighthouse", "model": "tiny", "seed": 1, "width": 64, "height": 64, "steps": 2}
MAX_BATCH = 8
JOBS = int(os.environ.get("SDFARM_FAIR_SHARE_JOBS", "200"))  # each tenant's, hostile story


def _farm(redis_url: str, weights: dict[str, float] | None = None) -> tuple[Ledger, Dispatcher]:
    settings = Settings.model_validate(
        {
            "redis_url": redis_url,
            "models": {"tiny": "/unused"},
            "max_batch": MAX_BATCH,
            "queue_chunks_per_worker": 2,
            "batch_wait_ms": 0,
        }
    )
    ledger = Ledger(redis.Redis.from_url(redis_url), status_ttl_s=3600, lease_s=30)
    publish_heartbeat(ledger.redis, ledger.keys, "stand-in", {"models": ["tiny"]}, ttl_s=600)
    return ledger, Dispatcher(settings, ledger, make_celery(settings), weights=weights or {})


def _submit(ledger: Ledger, tenant: str, n: int, *, priority: int = 5) -> str:
    batch_id = new_batch_id()
    specs = [JobSpec.model_validate(SPEC | {"prompt": f"{tenant} {i}"}) for i in range(n)]
    ledger.create_batch(batch_id, specs, meta={"priority": str(priority)}, tenant=tenant)
    return batch_id


def _dispatched(ledger: Ledger, dispatcher: Dispatcher, chunks: int | None = None) -> list[str]:
    """Let the dispatcher top up and a stand-in worker take chunks off the queue until nothing
    is left (or `chunks` were taken); the tenant of each job, in the order they were sent."""
    owners: list[str] = []
    for _ in itertools.count() if chunks is None else range(chunks):
        dispatcher.top_up()
        raw = ledger.redis.rpop(model_queue("tiny"))
        if raw is None:
            break
        job_ids = json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
        owners += [ledger.batch_owners([job_id.rsplit("-", 1)[0]])[0] or "?" for job_id in job_ids]
    return owners


def _longest_run(owners: list[str], of: str | None = None) -> tuple[str, int]:
    """The tenant with the longest run of consecutive jobs (of tenant `of`), and its length."""
    runs = [(owner, len(list(group))) for owner, group in itertools.groupby(owners)]
    return max((run for run in runs if of in (None, run[0])), key=lambda run: run[1])


def test_a_tenant_of_many_one_job_batches_gets_no_more_than_its_share(redis_url: str) -> None:
    # Given a hostile tenant that split its work into one-job batches, submitted first, and a
    # normal tenant with one big batch submitted after all of them
    ledger, dispatcher = _farm(redis_url)
    for _ in range(JOBS):
        _submit(ledger, "hostile", 1)
    _submit(ledger, "normal", JOBS)
    # When the dispatcher sends everything
    owners = _dispatched(ledger, dispatcher)
    # Then every job was sent once, and the two tenants took turns chunk by chunk
    assert sorted(owners) == ["hostile"] * JOBS + ["normal"] * JOBS
    who, run = _longest_run(owners)
    first = owners[:JOBS]
    hostile_share = first.count("hostile") / len(first)
    print(
        f"\nhostile ({JOBS} one-job batches) vs normal (one {JOBS}-job batch), chunks of "
        f"{MAX_BATCH}: longest run {run} jobs ({who}); hostile's share of the first {JOBS} "
        f"jobs sent {hostile_share:.1%}, normal's {1 - hostile_share:.1%}"
    )
    assert run <= 2 * MAX_BATCH
    assert 0.45 <= hostile_share <= 0.55


def test_weights_split_the_jobs_in_proportion(redis_url: str) -> None:
    # Given tenant big with weight 3 and tenant small with weight 1, both with much work
    ledger, dispatcher = _farm(redis_url, weights={"big": 3.0, "small": 1.0})
    _submit(ledger, "small", 320)
    _submit(ledger, "big", 320)
    # When 20 chunks are sent
    owners = _dispatched(ledger, dispatcher, chunks=20)
    # Then big got three jobs for each of small's
    share = owners.count("big") / len(owners)
    print(f"\nweights 3:1: the weight-3 tenant got {share:.1%} of the first {len(owners)} jobs")
    assert len(owners) == 160
    assert 0.70 <= share <= 0.80


def test_the_tenants_files_weights_reach_the_dispatcher(redis_url: str, tmp_path: Path) -> None:
    # Given a tenants file that gives alpha weight 3 and leaves beta at the default
    path = tmp_path / "tenants.toml"
    path.write_text(
        f'[tenants.alpha]\nkeys_sha256 = ["{"a" * 64}"]\nweight = 3\n\n'
        f'[tenants.beta]\nkeys_sha256 = ["{"b" * 64}"]\n'
    )
    ledger, _ = _farm(redis_url)
    settings = Settings.model_validate(
        {"redis_url": redis_url, "models": {"tiny": "/unused"}, "max_batch": MAX_BATCH,
         "batch_wait_ms": 0, "tenants_file": path}
    )  # fmt: skip
    # When a dispatcher starts from those settings, with both tenants' work queued
    dispatcher = Dispatcher(settings, ledger, make_celery(settings))
    _submit(ledger, "beta", 160)
    _submit(ledger, "alpha", 160)
    owners = _dispatched(ledger, dispatcher, chunks=8)
    # Then it weighs them 3:1
    assert dispatcher.weights == {"alpha": 3.0, "beta": 1.0}
    assert owners.count("alpha") == 48 and owners.count("beta") == 16


def test_a_tenants_batches_share_its_turns_and_not_more(redis_url: str) -> None:
    # Given tenant alpha with two batches and tenant beta with one
    ledger, _ = _farm(redis_url)
    a1 = _submit(ledger, "alpha", 80)
    a2 = _submit(ledger, "alpha", 80)
    _submit(ledger, "beta", 80)
    # When 12 chunks are taken
    batches = []
    for _ in range(12):
        chunk = ledger.take("tiny", MAX_BATCH, weights={}).chunk
        assert chunk is not None
        batches.append({job_id.rsplit("-", 1)[0] for job_id in chunk.job_ids})
    # Then beta had every other chunk, and alpha's two batches took turns within alpha's half
    owners = [ledger.batch_owners(sorted(b))[0] for b in batches]
    assert owners.count("beta") == 6 and _longest_run(owners)[1] == 1
    alpha = [b for b, owner in zip(batches, owners, strict=True) if owner == "alpha"]
    assert alpha == [{a1}, {a2}] * 3


def test_priority_goes_before_the_share(redis_url: str) -> None:
    # Given tenant alpha, already served a lot, and tenant beta, both waiting at priority 5
    ledger, _ = _farm(redis_url)
    _submit(ledger, "alpha", 80)
    for _ in range(4):
        ledger.take("tiny", MAX_BATCH)
    _submit(ledger, "beta", 40)
    # When alpha submits priority-9 work
    urgent = _submit(ledger, "alpha", 16, priority=9)
    # Then the urgent work goes first, whatever alpha's share so far
    taken = [ledger.take("tiny", MAX_BATCH).chunk for _ in range(2)]
    assert all(c is not None and c.job_ids[0].startswith(urgent) for c in taken)


def test_a_tenant_kept_waiting_by_more_urgent_work_banks_one_chunk_at_most(
    redis_url: str,
) -> None:
    # Given alpha's priority-9 batch served for 10 chunks while beta's priority-5 batch waited
    ledger, dispatcher = _farm(redis_url)
    _submit(ledger, "alpha", 80, priority=9)
    _submit(ledger, "alpha", 200)
    _submit(ledger, "beta", 200)
    owners = _dispatched(ledger, dispatcher, chunks=22)
    assert owners[: 10 * MAX_BATCH] == ["alpha"] * 80
    # When both then have priority-5 work, Then beta is not owed the 10 chunks it waited: it
    # gets at most one chunk of credit, then they take turns
    after = owners[10 * MAX_BATCH :]
    print(f"\nafter the urgent work, by chunk: {after[::MAX_BATCH]}")
    assert _longest_run(after, "beta")[1] <= 2 * MAX_BATCH
    assert 5 * MAX_BATCH <= after.count("beta") <= 7 * MAX_BATCH


def test_a_tenant_that_returns_after_a_pause_is_not_owed_its_idle_time(redis_url: str) -> None:
    # Given alpha alone on the farm for 10 chunks
    ledger, dispatcher = _farm(redis_url)
    _submit(ledger, "alpha", 400)
    assert _dispatched(ledger, dispatcher, chunks=10) == ["alpha"] * 80
    # When beta arrives
    _submit(ledger, "beta", 200)
    owners = _dispatched(ledger, dispatcher, chunks=12)
    # Then beta starts at once, and they take turns from there
    print(f"\nafter beta arrived, by chunk: {owners[::MAX_BATCH]}")
    assert "beta" in owners[: 3 * MAX_BATCH]
    assert _longest_run(owners)[1] <= 2 * MAX_BATCH


def test_turns_kept_by_a_farm_from_before_tenants_are_taken_over(redis_url: str) -> None:
    # Given a batch queued as a farm from before tenants kept it: in one turn order per model
    ledger, _ = _farm(redis_url)
    batch_id = _submit(ledger, "alpha", 12)
    keys, client = ledger.keys, ledger.redis
    compat = ledger.job(ledger.batch_job_ids(batch_id)[0])["compat"]
    score = client.zscore(keys.batch_turns("tiny", "alpha"), batch_id)
    assert score is not None
    client.delete(
        keys.batch_turns("tiny", "alpha"),
        keys.tenant_turns("tiny"),
        keys.tenant_pending("alpha", compat),
    )
    client.zadd(keys.turns("tiny"), {batch_id: score})
    assert ledger.stats.pending_jobs("tiny") == 12
    # When chunks are taken
    chunks = [ledger.take_chunk("tiny", MAX_BATCH) for _ in range(3)]
    # Then all its jobs are sent, once, and nothing of the old order is left
    sizes = [len(c.job_ids) if c else 0 for c in chunks]
    assert sizes == [8, 4, 0]
    assert not client.exists(keys.turns("tiny"))
    assert ledger.pending_models() == []
