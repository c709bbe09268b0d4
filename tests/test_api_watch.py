"""Watching and changing your mind: ETA and queue position, the manifest, cancel and retry."""

from __future__ import annotations

import json

from shared.jobs import JobState
from tests.fixtures_api import Api


def _submit(api: Api, count: int, **body: object) -> dict:
    prompts = [f"a paper boat number {i}" for i in range(count)]
    response = api.http.post("/v1/batches", json={"prompts": prompts, **body})
    assert response.status_code == 201, response.text
    return response.json()


def test_eta_and_queue_position_come_from_measured_throughput(api: Api) -> None:
    # Given a farm that has just rendered 4 images, and two batches waiting behind them
    warmup = _submit(api, 4)
    for job_id in warmup["job_ids"]:
        api.render_as_worker(job_id)
    first = _submit(api, 6)
    second = _submit(api, 3)
    urgent = _submit(api, 2, priority=9)
    # When each is looked at
    a, b, c = (api.http.get(f"/v1/batches/{s['batch_id']}").json() for s in (first, second, urgent))
    # Then the throughput is measured, the older and more urgent batches count as ahead
    assert a["throughput"] > 0
    assert a["queue_position"] == 2  # the urgent batch goes first
    assert b["queue_position"] == 2 + 6
    assert c["queue_position"] == 0
    # And the ETA is the work ahead plus its own over that throughput
    assert abs(b["eta_s"] - (2 + 6 + 3) / b["throughput"]) < 1e-6
    assert a["models"] == ["tiny"]
    # And a finished batch has no position and nothing left to wait for
    done = api.http.get(f"/v1/batches/{warmup['batch_id']}").json()
    assert (done["queue_position"], done["eta_s"]) == (None, 0.0)


def test_cancelling_a_batch_ends_every_queued_job_cancelled(api: Api) -> None:
    # Given a batch of 5 queued jobs, one of which is already rendering
    submitted = _submit(api, 5)
    running = submitted["job_ids"][0]
    api.ledger.force(running, [JobState.QUEUED], JobState.RUNNING, {"worker": "w"})
    # When the batch is cancelled
    response = api.http.delete(f"/v1/batches/{submitted['batch_id']}")
    # Then the queued ones are cancelled at once and the running one is asked to stop
    assert response.status_code == 200
    body = response.json()
    assert (body["cancelled"], body["stopping"]) == (4, 1)
    assert body["counts"] == {
        "queued": 0,
        "running": 1,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 4,
    }
    assert api.ledger.job(running)["cancel_requested"] == "1"
    assert {api.ledger.job(j)["state"] for j in submitted["job_ids"][1:]} == {"cancelled"}


def test_retry_requeues_failed_and_cancelled_jobs_with_their_original_seeds(api: Api) -> None:
    # Given a batch that ended with one success, one failure and two cancellations
    submitted = _submit(api, 4, defaults={"steps": 5})
    ok, bad, *rest = submitted["job_ids"]
    api.render_as_worker(ok)
    api.render_as_worker(bad, fail="render failed: out of memory")
    api.http.delete(f"/v1/jobs/{rest[0]}")
    api.http.delete(f"/v1/jobs/{rest[1]}")
    seeds = {j: api.ledger.job(j)["seed"] for j in submitted["job_ids"]}
    assert api.ledger.batch(submitted["batch_id"]).get("finished_at")
    # When the batch is retried
    response = api.http.post(f"/v1/batches/{submitted['batch_id']}/retry")
    # Then the three unfinished jobs are queued again, same seeds, attempts reset, errors gone
    assert response.status_code == 200
    assert response.json()["requeued"] == 3
    assert response.json()["counts"]["queued"] == 3
    assert response.json()["counts"]["succeeded"] == 1
    for job_id in (bad, *rest):
        record = api.ledger.job(job_id)
        assert (record["state"], record["attempts"], record["seed"]) == ("queued", 0, seeds[job_id])
        assert "error" not in record
    # And the batch is open again, so the dispatcher can hand the jobs out
    assert "finished_at" not in api.ledger.batch(submitted["batch_id"])
    api.render_as_worker(bad)
    assert api.ledger.job(bad)["state"] == "succeeded"


def test_the_manifest_streams_and_is_stored_next_to_the_images_when_the_batch_ends(
    api: Api,
    s3_service,
) -> None:
    # Given a batch of three: one rendered, one failed, one cancelled (so the batch ends)
    submitted = _submit(api, 3, defaults={"seed": 11})
    ok, bad, gone = submitted["job_ids"]
    api.render_as_worker(ok)
    api.render_as_worker(bad, fail="render failed: NaN in latents")
    api.http.delete(f"/v1/jobs/{gone}")
    # When the manifest is asked for
    response = api.http.get(f"/v1/batches/{submitted['batch_id']}/manifest")
    lines = [json.loads(line) for line in response.text.splitlines()]
    # Then it has one line per job in submit order, with what was asked and what became of it
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert [line["job_id"] for line in lines] == submitted["job_ids"]
    assert [line["state"] for line in lines] == ["succeeded", "failed", "cancelled"]
    assert lines[0]["key"] == f"x/{ok}.png"
    assert lines[0]["seed"] == 11
    assert lines[0]["params"]["steps"] == 30
    assert lines[1]["error"] == "render failed: NaN in latents"
    # And the same manifest lands in S3 beside the images once the batch has ended
    prefix = api.settings.storage_url.removeprefix(f"s3://{s3_service.bucket}/")
    key = f"{prefix}/{submitted['batch_id']}/manifest.ndjson"
    api.wait_for(lambda: api.ledger.batch(submitted["batch_id"]).get("manifest") == key)
    stored = s3_service.client().get_object(Bucket=s3_service.bucket, Key=key)["Body"].read()
    assert [json.loads(line) for line in stored.decode().splitlines()] == lines
    assert api.http.get(f"/v1/batches/{submitted['batch_id']}").json()["manifest"] == key
