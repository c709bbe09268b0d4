"""A store that will not take the images: a worker says so at start, and jobs do not cycle for ever.

An outage hands jobs back without charging an attempt, so that it delays work without failing
it. Two things keep that from becoming an endless loop:

- a worker checks at start that it can write to the store; a refusal (wrong credentials, no such
  bucket) stops it before it loads a model, with the reason;
- a job whose image could not be stored for `storage_give_up_s` since its first hand-back fails,
  with the store's error.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import boto3
import pytest
import redis

from producer.client import FarmClient
from producer.services import S3Service, start_seaweedfs
from shared.errors import StorageRefused
from shared.ledger import Ledger
from shared.storage import PROBE_FOLDER, S3Storage
from tests.fixtures_farm import FarmEnv


def test_the_start_check_tells_a_refusal_from_a_store_that_works(
    s3_service: S3Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the store, with the right credentials and then with a wrong secret
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_service.access_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_service.region)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_service.secret_key)
    good = S3Storage(s3_service.bucket, "checks", endpoint_url=s3_service.endpoint_url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the credentials it read
    wrong = S3Storage(s3_service.bucket, "checks", endpoint_url=s3_service.endpoint_url)

    # When each checks, Then the good one passes and leaves no probe behind
    good.check("w1")
    assert not good.exists(f"checks/{PROBE_FOLDER}/w1")
    # and the wrong one is refused, not merely failed: waiting would not help
    with pytest.raises(StorageRefused, match="refused"):
        wrong.check("w2")


def test_a_worker_the_store_refuses_does_not_start(farm_env: FarmEnv) -> None:
    # Given a worker whose S3 secret is wrong
    worker = farm_env.start_worker(extra_env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})

    # When it starts, Then it exits with status 2 and says why, before loading any model
    deadline = time.monotonic() + 60
    while worker.is_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not worker.is_running()
    assert worker.returncode == 2
    log = worker.log_tail()
    assert "the image store refuses this worker" in log
    assert "AWS_* credentials" in log
    assert "loading model" not in log


def test_jobs_whose_images_cannot_be_stored_fail_after_the_give_up_time(
    farm_env: FarmEnv, serve_api, tmp_path: Path
) -> None:
    # Given a worker that stores to its own SeaweedFS, and gives up on a job's image 3 s after
    # its first hand-back
    store = start_seaweedfs(
        tmp_path / "store",
        access_key=f"sdfarm{secrets.token_hex(8)}",
        secret_key=secrets.token_urlsafe(30),
        bucket="give-up",
    )
    give_up_s = 3.0
    try:
        farm_env.start_worker(
            extra_env={
                "SDFARM_STORAGE_URL": "s3://give-up/images",
                "SDFARM_S3_ENDPOINT_URL": store.endpoint_url,
                "AWS_ACCESS_KEY_ID": store.access_key,
                "AWS_SECRET_ACCESS_KEY": store.secret_key,
                "SDFARM_STORAGE_GIVE_UP_S": str(give_up_s),
                "SDFARM_STORAGE_PUT_ATTEMPTS": "1",
                "SDFARM_STORAGE_BACKOFF_S": "0.1",
            }
        )
        api_url = serve_api(farm_env.settings)
        farm_env.wait_for_workers(1)
    finally:
        # and that store gone for good once the worker is up
        store.stop()

    # When two jobs are submitted
    with FarmClient(api_url) as client:
        submitted = client.submit(prompts=["a", "b"], defaults={"width": 64, "height": 64})
        started = time.time()
        batch = client.wait(submitted["batch_id"], poll_s=0.2, timeout_s=120)
        jobs = list(client.jobs(submitted["batch_id"]))

    # Then both end failed, not lost and not cycling, with the store's error in theirs
    assert batch["counts"]["failed"] == 2, batch["counts"]
    ledger = Ledger(redis.Redis.from_url(farm_env.settings.redis_url), status_ttl_s=60, lease_s=10)
    for job in jobs:
        assert job["state"] == "failed"
        assert "could not be stored" in job["error"], job["error"]
        assert "s3://give-up/images/" in job["error"], job["error"]
        record = ledger.job(job["job_id"])
        # handed back, no attempt charged, until the give-up time had passed since the first
        first_failure = float(record["storage_failing_since"])
        assert started <= first_failure
        assert float(record["finished_at"]) - first_failure >= give_up_s
        assert record["attempts"] <= 1
