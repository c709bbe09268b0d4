"""Cancelling against a real worker: queued jobs never render, even when their chunk already
sits in the broker; a running job stops at its next sampling step and ends `cancelled`."""

from __future__ import annotations

import time

import pytest

from producer.client import FarmClient
from tests.fixtures_farm import FarmEnv

LONG = {"width": 64, "height": 64, "steps": 150}  # minutes of CPU: it only ends by a cancel
SHORT = {"width": 64, "height": 64, "steps": 3}  # another compat key: a chunk of its own


def test_cancel_stops_a_running_job_and_queued_jobs_never_render(
    farm_env: FarmEnv,
    serve_api,
    s3_service,
    request: pytest.FixtureRequest,
) -> None:
    # Given one worker busy with a long job, and a batch queued behind it (already dispatched)
    farm_env.start_worker(extra_env={"SDFARM_PROGRESS_INTERVAL_S": "0.05"})
    url = serve_api(farm_env.settings)
    farm_env.wait_for_workers(1)
    client = FarmClient(url)
    request.addfinalizer(client.close)
    running = client.submit(prompts=["a very slow lighthouse"], defaults=LONG)
    job_id = running["job_ids"][0]
    reached = {step: _wait_for_step(client, job_id, step) for step in (2, 4)}
    step_s = (reached[4] - reached[2]) / 2  # how long one sampling step takes here, now
    waiting = client.submit(prompts=["a kite", "a comet"], defaults=SHORT)
    # When the queued batch is cancelled, and then the running job
    assert client.cancel_batch(waiting["batch_id"])["cancelled"] == 2
    step_at_cancel = client.job(job_id)["progress"]["step"]
    asked = time.monotonic()
    assert client.cancel(job_id)["was"] == "running"
    while client.job(job_id)["state"] == "running":
        assert time.monotonic() - asked < 30, "the running job did not stop"
        time.sleep(0.02)
    stopped_after_s = time.monotonic() - asked
    # Then the running job ended cancelled long before its 150 steps, within a step or so
    job = client.job(job_id)
    print(
        f"\nrunning job stopped {stopped_after_s:.2f} s after the cancel at step "
        f"{step_at_cancel}; one step takes {step_s:.2f} s"
    )
    assert job["state"] == "cancelled"
    assert job["error"] == "cancelled while rendering"
    assert job["progress"]["step"] < LONG["steps"]
    # (the step in flight finishes, then the next step boundary raises; the rest is Redis)
    assert stopped_after_s < 2 * step_s + 1.0
    # And the worker then took the queued batch's chunk but rendered none of it
    client.wait(waiting["batch_id"], timeout_s=10)
    time.sleep(1.0)  # let the worker reach the already-sent chunk
    for queued_id in waiting["job_ids"]:
        queued = client.job(queued_id)
        assert (queued["state"], queued["attempts"], queued["worker"]) == ("cancelled", 0, None)
    # And no image of any of them exists in S3
    listed = s3_service.client().list_objects_v2(Bucket=s3_service.bucket)
    keys = [item["Key"] for item in listed.get("Contents", [])]
    images = [k for k in keys if k.endswith(".png")]
    assert not [k for k in images if running["batch_id"] in k or waiting["batch_id"] in k]


def _wait_for_step(client: FarmClient, job_id: str, step: int) -> float:
    deadline = time.monotonic() + 120
    while client.job(job_id)["progress"]["step"] < step:
        assert time.monotonic() < deadline, client.job(job_id)
        time.sleep(0.02)
    return time.monotonic()
