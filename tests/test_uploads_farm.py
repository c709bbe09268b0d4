"""An init image that is a decompression bomb fails its own job only, not the other batch's job in
its chunk: through the real producer code, ledger and chunk runtime (the first test), and
through a running farm with a Celery worker process (the second)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import FarmClient
from producer.services import S3Service
from producer.submit import submit_batch
from shared.config import Settings
from shared.ledger import Ledger
from shared.storage import open_storage
from tests.fixtures_farm import FarmEnv
from tests.test_uploads import b64, noise_png, png_header
from worker.chunk import process_chunk
from worker.context import WorkerContext
from worker.models import LoadedModel, load_model

JOB = {"model": "tiny", "width": 64, "height": 64, "steps": 2, "strength": 0.6}


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model("tiny", str(tiny_model_dir))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def test_an_s3_bomb_under_an_allowed_prefix_fails_only_its_job_in_a_shared_chunk(
    client: redis.Redis,
    s3_service: S3Service,
    tiny_model: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a farm on S3 that lets jobs name images under `inputs-X/`, where a 45-byte PNG
    # claiming 20000x20000 pixels lies
    for name, value in (
        ("AWS_ACCESS_KEY_ID", s3_service.access_key),
        ("AWS_SECRET_ACCESS_KEY", s3_service.secret_key),
        ("AWS_DEFAULT_REGION", s3_service.region),
    ):
        monkeypatch.setenv(name, value)
    bucket, inputs = s3_service.bucket, f"inputs-{secrets.token_hex(4)}"
    s3_service.client().put_object(
        Bucket=bucket, Key=f"{inputs}/bomb.png", Body=png_header(20000, 20000)
    )
    settings = Settings(
        redis_url="redis://unused",
        storage_url=f"s3://{bucket}/farm-{secrets.token_hex(4)}",
        s3_endpoint_url=s3_service.endpoint_url,
        models={"tiny": tiny_model.path},
        init_image_prefixes=f"s3://{bucket}/{inputs}/",
    )
    storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url)
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    # When one batch names the bomb and another batch a good base64 image, both img2img jobs
    # of the same size and steps
    bomb = submit_batch(
        ledger,
        settings,
        [{**JOB, "prompt": "a fox", "init_image": f"s3://{bucket}/{inputs}/bomb.png"}],
        storage=storage,
    ).job_ids[0]
    good_image = {"init_image": b64(noise_png(64)), "seed": 7}
    good = submit_batch(
        ledger, settings, [{**JOB, "prompt": "a fox", **good_image}], storage=storage
    ).job_ids[0]
    # Then the dispatcher's take puts them in one chunk
    chunk = ledger.take_chunk("tiny", 8)
    assert chunk is not None and sorted(chunk.job_ids) == sorted([bomb, good])

    # When a worker processes that chunk
    ctx = WorkerContext(
        settings=settings,
        ledger=ledger,
        storage=storage,
        models={"tiny": tiny_model},
        worker_id="test-worker",
    )
    outcome = process_chunk(ctx, chunk.job_ids, "tiny")

    # Then the bomb's job failed at its first attempt as invalid input, naming the bound
    record = ledger.job(bomb)
    assert record["state"] == "failed" and record["reason"] == "invalid_input", record
    assert "20000x20000" in record["error"] and record["attempts"] == 1, record
    # And the other batch's job rendered from its stored upload
    assert outcome.failed == [bomb] and outcome.succeeded == [good]
    assert ledger.job(good)["spec"]["init_image"].startswith("upload:default/sha256:")


def test_in_a_running_farm_the_bomb_fails_alone_and_the_other_batch_renders(
    farm_env: FarmEnv, serve_api: Any, s3_service: S3Service
) -> None:
    # Given a farm with one worker whose dispatcher holds a chunk 3 s for company, and a bomb
    # under the operator's `inputs/` folder
    key = f"inputs/bomb-{secrets.token_hex(4)}.png"
    s3_service.client().put_object(Bucket=s3_service.bucket, Key=key, Body=png_header(20000, 20000))
    farm_env.start_worker()
    api_url = serve_api(farm_env.settings.model_copy(update={"batch_wait_ms": 3000}))
    farm_env.wait_for_workers(1)
    with FarmClient(api_url) as client:
        good_ref = client.upload(noise_png(64))
        # When two batches arrive together: one names the bomb, the other a good upload
        bad = client.submit(
            jobs=[{**JOB, "prompt": "a fox", "init_image": f"s3://{s3_service.bucket}/{key}"}]
        )
        good = client.submit(jobs=[{**JOB, "prompt": "a fox", "init_image": good_ref}])
        for batch in (bad, good):
            client.wait(batch["batch_id"], poll_s=0.2, timeout_s=180)
        bad_job, good_job = (client.job(b["job_ids"][0]) for b in (bad, good))
    # Then the bomb's job failed at its first attempt, saying why; the other one rendered
    assert bad_job["state"] == "failed" and bad_job["attempts"] == 1, bad_job
    assert "20000x20000" in (bad_job["error"] or ""), bad_job
    assert good_job["state"] == "succeeded", good_job
    # And they were claimed together, as one chunk of the same worker
    ledger = Ledger(redis.Redis.from_url(farm_env.settings.redis_url), status_ttl_s=60, lease_s=10)
    claimed = [ledger.job(j["job_id"]) for j in (bad_job, good_job)]
    assert claimed[0]["worker"] == claimed[1]["worker"]
    assert abs(float(claimed[0]["started_at"]) - float(claimed[1]["started_at"])) < 0.5
    ledger.close()
