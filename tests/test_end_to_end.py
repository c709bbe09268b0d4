"""The whole path: prompts through the API, rendered by real worker processes, stored in S3."""

from __future__ import annotations

import json
import re

import redis

from producer.client import FarmClient
from shared.keys import Keys
from shared.ledger import STATES
from shared.metadata import read_png_metadata
from tests.fixtures_farm import FarmEnv

PROMPTS = [f"a watercolor of lighthouse number {i}, stormy sea" for i in range(24)]


def test_24_prompts_through_the_api_end_as_24_pngs_in_s3(
    farm_env: FarmEnv, serve_api, s3_service
) -> None:
    # Given a farm with two worker processes serving the tiny model
    farm_env.start_worker()
    farm_env.start_worker()
    api_url = serve_api(farm_env.settings)
    farm_env.wait_for_workers(2)

    # When 24 prompts are submitted through the API
    with FarmClient(api_url) as client:
        submitted = client.submit(
            prompts=PROMPTS,
            defaults={"width": 64, "height": 64, "steps": 8, "negative_prompt": "blurry"},
        )
        status = client.wait(submitted["batch_id"], poll_s=0.2, timeout_s=300)
        jobs = list(client.jobs(submitted["batch_id"]))

    # Then every job succeeded and the counters add up
    assert status["counts"]["succeeded"] == 24, status
    assert sum(status["counts"].values()) == status["total"] == 24
    assert [job["state"] for job in jobs] == ["succeeded"] * 24

    # And both workers took part
    assert len({job["worker"] for job in jobs}) == 2

    # And each PNG in S3 carries its generation parameters
    s3 = s3_service.client()
    for job, prompt in zip(jobs, PROMPTS, strict=True):
        key = job["result"]["key"]
        assert key.endswith(f"/{submitted['batch_id']}/{job['job_id']}.png")
        data = s3.get_object(Bucket=s3_service.bucket, Key=key)["Body"].read()
        meta = read_png_metadata(data)
        lines = meta["parameters"].split("\n")
        assert lines[0] == prompt
        assert lines[1] == "Negative prompt: blurry"
        assert re.fullmatch(
            rf"Steps: 8, Sampler: LMS, CFG scale: 7.5, Seed: {job['spec']['seed']}, Size: 64x64, "
            r"RNG: CPU, Model hash: [0-9a-f]{10}, Model: tiny",
            lines[2],
        ), lines[2]
        assert json.loads(meta["sdfarm"])["spec"]["prompt"] == prompt

    # And the ledger's batch counters still equal the total
    client_redis = redis.Redis.from_url(farm_env.settings.redis_url)
    counters = client_redis.hmget(Keys().batch(submitted["batch_id"]), ["total", *STATES])
    assert int(counters[0]) == sum(int(c) for c in counters[1:])


def test_image_route_redirects_to_a_presigned_url(farm_env: FarmEnv, serve_api) -> None:
    # Given a finished job
    farm_env.start_worker()
    api_url = serve_api(farm_env.settings)
    with FarmClient(api_url) as client:
        submitted = client.submit(
            prompts=["a red apple"], defaults={"width": 64, "height": 64, "steps": 4, "seed": 7}
        )
        client.wait(submitted["batch_id"], poll_s=0.2, timeout_s=180)
        job_id = submitted["job_ids"][0]
        # When its image is asked for, Then the redirect leads to the PNG in S3
        raw = client.http.get(f"/v1/jobs/{job_id}/image")
        assert raw.status_code == 307
        assert "X-Amz-Expires=900" in raw.headers["location"]
        data = client.image(job_id)
    assert data.startswith(b"\x89PNG")
    assert "Seed: 7" in read_png_metadata(data)["parameters"]
