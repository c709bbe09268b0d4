"""The fault suite, sized down for `make test`: every scenario of issue 5 on one real local farm.

The farm (Redis with AOF, SeaweedFS, the API, two worker processes on the tiny model) runs with
its timeouts shortened through settings (`tests.faults.harness.FARM_ENV`): leases of 4 s, a
dispatch timeout of 10 s, a visibility timeout of 6 s. `make faults` runs the same scenarios
full size and prints the table. Every scenario ends with no job lost, none duplicated (one object
and one `succeeded` transition per job) and the batch counters adding up.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from shared.config import Settings
from shared.ids import new_batch_id
from shared.jobs import JobSpec
from shared.ledger import Ledger
from shared.storage import open_storage
from tests.faults import infra, work
from tests.faults.harness import SMALL, FaultFarm, Row
from worker.chunk import WorkerContext, process_chunk
from worker.models import load_model


@pytest.fixture(scope="module")
def fault_farm(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    redis_server_bin: str,
    weed_bin: str,
) -> Iterator[FaultFarm]:
    ff = FaultFarm.start(tmp_path_factory.mktemp("faults"), SMALL, model_dir=tiny_model_dir)
    yield ff
    ff.stop()


@pytest.fixture
def farm(fault_farm: FaultFarm) -> FaultFarm:
    """The module's farm, healed of whatever the previous scenario left broken."""
    fault_farm.heal()
    return fault_farm


def _assert_nothing_lost_or_duplicated(row: Row) -> None:
    assert row.problems() == [], f"{row.scenario}: {row.problems()} ({row.notes})"
    assert row.succeeded + row.failed == row.submitted


def test_a_worker_killed_mid_chunk_twice_loses_no_job(farm: FaultFarm) -> None:
    # Given a batch rendering on two workers, When worker-0 is killed -9 mid-chunk twice
    row = infra.kill_worker_twice(farm)
    # Then every job succeeded once, and each recovery took seconds, not a visibility timeout
    _assert_nothing_lost_or_duplicated(row)
    assert row.succeeded == row.submitted
    assert row.recovery_s is not None and row.recovery_s < 60


def test_sigterm_lets_the_running_chunk_finish_or_hands_it_back(farm: FaultFarm) -> None:
    # Given a batch rendering, When worker-0 gets SIGTERM mid-chunk (with a grace, then without)
    row = infra.sigterm_worker(farm)
    _assert_nothing_lost_or_duplicated(row)
    # Then the worker exits cleanly both times
    assert row.details["exit_codes"] == [0, 0]
    records = row.details["records"]
    # And with the grace its chunk finished there, in its first attempt
    assert all(records[j]["state"] == "succeeded" for j in row.details["finishing"])
    assert all(records[j]["attempts"] == 1 for j in row.details["finishing"])
    # And without it the chunk was handed back, no attempt charged, and rendered elsewhere
    for job_id in row.details["handed"]:
        assert "shut down" in records[job_id]["last_error"], records[job_id]
        assert records[job_id]["attempts"] == 1, records[job_id]
    assert row.succeeded == row.submitted


def test_a_redis_restart_mid_batch_loses_nothing_and_workers_consume_on(farm: FaultFarm) -> None:
    # Given a batch rendering, When Redis (AOF on) restarts
    row = infra.restart_redis(farm)
    # Then the batch ends whole, on the same worker processes, and new work renders after it
    _assert_nothing_lost_or_duplicated(row)
    assert row.succeeded == row.submitted
    assert row.details["same_workers"]
    assert row.details["after"]["succeeded"] == 4


def test_a_deleted_celery_queue_is_rebuilt_from_the_ledger(farm: FaultFarm) -> None:
    # Given chunks waiting in the broker, When the queue key is deleted
    row = infra.delete_queue(farm)
    # Then the reconciler sent the lost jobs again and all of them succeeded
    _assert_nothing_lost_or_duplicated(row)
    assert row.details["resent"] > 0
    assert row.succeeded == row.submitted


def test_a_storage_outage_delays_jobs_but_fails_none(farm: FaultFarm) -> None:
    # Given a batch rendering, When SeaweedFS stops for a while and comes back
    row = infra.storage_outage(farm)
    # Then jobs were handed back while it was down, and every one succeeded with its object
    _assert_nothing_lost_or_duplicated(row)
    assert row.details["handed_back"] > 0
    assert row.succeeded == row.submitted


def test_a_chunk_outliving_the_visibility_timeout_is_delivered_again_harmlessly(
    farm: FaultFarm,
) -> None:
    # Given one chunk that renders for longer than the 6 s visibility timeout
    row = infra.outlive_visibility(farm)
    # Then Celery delivered it a second time, that copy skipped, and each job has one result
    _assert_nothing_lost_or_duplicated(row)
    assert row.details["chunk_s"] > 6
    assert row.details["copies"] >= 1
    assert row.succeeded == row.submitted


def test_two_workers_handed_the_same_chunk_store_one_image_per_job(farm: FaultFarm) -> None:
    # Given the same chunk sent three times, When two workers take copies at once
    row = infra.same_chunk_twice(farm)
    assert row.details["took_a_copy"] == {0, 1}
    # Then each job succeeded exactly once, with exactly one object
    _assert_nothing_lost_or_duplicated(row)
    assert row.succeeded == row.submitted == 4


def test_a_poison_job_fails_alone_after_its_attempts_with_a_readable_reason(
    farm: FaultFarm,
) -> None:
    # Given a batch with one poison job (the fault-injection marker) among good ones
    row = work.poison_job(farm)
    _assert_nothing_lost_or_duplicated(row)
    # Then only the poison job failed, after 3 attempts, saying why
    poison = row.details["poison"]
    assert row.failed == 1 and poison["state"] == "failed"
    assert "poison marker" in poison["error"] and "after 3 attempts" in poison["error"]
    # And its chunk-mates succeeded at their first attempt
    records = row.details["records"]
    good = [r for job_id, r in records.items() if job_id != row.details["poison_id"]]
    assert all(r["state"] == "succeeded" and r["attempts"] == 1 for r in good)


def test_out_of_memory_splits_chunks_and_the_workers_survive(farm: FaultFarm) -> None:
    # Given workers whose passes above one row run out of memory (test hook)
    row = work.out_of_memory(farm)
    # Then every job succeeded in a pass of one row, and no worker process died
    _assert_nothing_lost_or_duplicated(row)
    assert row.succeeded == row.submitted
    assert row.details["survived"]
    assert row.details["rows_per_pass"] == {1}
    assert row.details["splits"] > 0


def test_bad_input_sent_while_a_batch_renders_is_refused_and_the_batch_finishes(
    farm: FaultFarm,
) -> None:
    # Given a batch rendering, When the whole bad-input corpus is sent to the API
    row = work.bad_input_while_rendering(farm)
    # Then each request got a good 4xx, none created a batch, and the batch finished
    assert row.details["problems"] == {}
    assert row.details["created"] == 0
    assert row.details["during"]["succeeded"] < row.submitted, "the batch had ended already"
    _assert_nothing_lost_or_duplicated(row)
    assert row.succeeded == row.submitted


def test_a_soak_with_worker_restarts_loses_nothing_and_memory_stays_flat(farm: FaultFarm) -> None:
    # Given many tiny jobs, When worker-0 is restarted every few dozen of them
    row = work.soak(farm)
    _assert_nothing_lost_or_duplicated(row)
    assert row.succeeded == row.submitted
    # Then neither worker's memory grows from one wave to the next: worker-0 before each
    # restart, worker-1 (never restarted) after each wave, within 10% of the first reading
    rss = row.details["rss"]
    assert len(rss) >= 3, rss
    for column in (1, 2):
        first, most = rss[0][column], max(sample[column] for sample in rss)
        assert most <= first * 1.10, f"RSS grew: {rss}"


def _live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): the latter wakes deprecated proxies in torch that warn.
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def test_an_out_of_memory_pass_leaves_no_tensor_alive(
    redis_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    # Given a worker context in this process whose passes above one row run out of memory
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path / 'images'}",
        models={"tiny": str(tiny_model_dir)},
        simulate_oom_above_batch=1,
    )
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    model = load_model("tiny", str(tiny_model_dir), device="cpu")
    ctx = WorkerContext(
        settings=settings,
        ledger=ledger,
        storage=open_storage(settings.storage_url),
        models={"tiny": model},
        worker_id="in-process",
    )
    spec = {"model": "tiny", "width": 64, "height": 64, "steps": 2, "seed": 1}
    specs = [JobSpec.model_validate({**spec, "prompt": f"a cat {i}"}) for i in range(5)]
    ids = ledger.create_batch(new_batch_id(), specs)
    process_chunk(ctx, ids[:1], "tiny")  # one pass that fits, so caches exist before counting
    before = _live_tensors()

    # When a chunk of four runs out of memory, in halves, then renders row by row
    outcome = process_chunk(ctx, ids[1:], "tiny")

    # Then all four succeeded, and the failed passes left no tensor behind
    assert sorted(outcome.succeeded) == sorted(ids[1:])
    assert [r["timings"]["batch_rows"] for r in ledger.jobs(ids[1:]) if r] == [1, 1, 1, 1]
    assert _live_tensors() == before
    client.close()
