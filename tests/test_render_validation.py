"""Bad sampler, img2img and long-prompt fields are refused at the door: 422, field named, nothing
enqueued."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from shared.config import Settings
from shared.jobs import SCHEDULERS
from shared.keys import Keys


def image_base64(width: int, height: int, fmt: str = "PNG") -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format=fmt)
    return base64.b64encode(out.getvalue()).decode()


@pytest.fixture
def api(redis_url: str, serve_api, tmp_path: Path) -> Iterator[httpx.Client]:
    settings = Settings(
        redis_url=redis_url, storage_url=f"file://{tmp_path}", models={"tiny": "/models/tiny"}
    )
    with httpx.Client(base_url=serve_api(settings)) as client:
        yield client


def _nothing_enqueued(redis_url: str) -> bool:
    client = redis.Redis.from_url(redis_url)
    try:
        prefix = Keys().prefix
        return not client.keys(f"{prefix}:job:*") and not client.keys(f"{prefix}:pending:*")
    finally:
        client.close()


SIZED = {"prompt": "x", "width": 64, "height": 64}


@pytest.mark.parametrize(
    ("job", "field", "words"),
    [
        ({"prompt": "x", "scheduler": "euler_ancestral"}, "scheduler", "'euler_a'"),
        ({"prompt": "x", "scheduler": "DPM++ 2M"}, "scheduler", "'dpmpp_2m_karras'"),
        (
            {**SIZED, "init_image": image_base64(64, 64), "strength": 0},
            "strength",
            "greater than 0",
        ),
        (
            {**SIZED, "init_image": image_base64(64, 64), "strength": 1.5},
            "strength",
            "less than or",
        ),
        ({**SIZED, "init_image": image_base64(64, 64), "strength": True}, "strength", "boolean"),
        ({"prompt": "x", "strength": 0.5}, "strength", "only to jobs with an init_image"),
        (
            {**SIZED, "init_image": base64.b64encode(b"GIF89a not really").decode()},
            "init_image",
            "not a PNG or JPEG image",
        ),
        ({**SIZED, "init_image": "this is not base64!"}, "init_image", "nor valid base64"),
        ({**SIZED, "init_image": image_base64(64, 48)}, "init_image", "is 64x48 but the job is"),
        ({**SIZED, "init_image": "s3://"}, "init_image", "must look like s3://bucket/key"),
        ({"prompt": "x", "long_prompt": "split"}, "long_prompt", "'truncate' or 'chunk'"),
    ],
)
def test_a_bad_render_field_is_refused_with_its_name_and_nothing_is_enqueued(
    api: httpx.Client, redis_url: str, job: dict, field: str, words: str
) -> None:
    # Given a batch with one good job and one bad one, When it is submitted
    response = api.post("/v1/batches", json={"jobs": [{"prompt": "fine"}, job]})
    # Then it is a 422 naming the bad job, its field and what is allowed, and nothing is queued
    assert response.status_code == 422, response.text
    body = response.json()
    problem = body["problems"][0]
    assert problem["job"] == 1 and problem["field"] == field, problem
    assert words in problem["message"], problem
    assert body["error"].startswith(f"job 1, field `{field}`")
    assert _nothing_enqueued(redis_url)


def test_an_unknown_sampler_is_refused_with_every_valid_name(api: httpx.Client) -> None:
    response = api.post("/v1/batches", json={"prompts": ["x"], "defaults": {"scheduler": "warp"}})
    assert response.status_code == 422
    message = response.json()["problems"][0]["message"]
    assert all(f"'{name}'" in message for name in SCHEDULERS), message


def test_an_s3_init_image_is_refused_by_a_farm_without_s3(
    api: httpx.Client, redis_url: str
) -> None:
    job = {**SIZED, "init_image": "s3://images/cat.png"}
    response = api.post("/v1/batches", json={"jobs": [job]})
    assert response.status_code == 422
    assert "not S3; send the image as base64" in response.json()["error"]
    assert _nothing_enqueued(redis_url)


def test_good_render_fields_are_accepted_and_kept_in_the_spec(api: httpx.Client) -> None:
    # Given every sampler, an img2img job (a JPEG resized on request) and a chunked long prompt
    jobs = [{"prompt": "x", "scheduler": name} for name in SCHEDULERS]
    jobs.append({**SIZED, "init_image": image_base64(80, 96, "JPEG"), "resize_init": True})
    jobs.append({"prompt": "x " * 200, "long_prompt": "chunk"})
    # When they are submitted, Then all are queued with their fields as given
    response = api.post("/v1/batches", json={"jobs": jobs})
    assert response.status_code == 201, response.text
    specs = [api.get(f"/v1/jobs/{j}").json()["spec"] for j in response.json()["job_ids"]]
    assert [s["scheduler"] for s in specs[: len(SCHEDULERS)]] == list(SCHEDULERS)
    assert specs[-2]["resize_init"] is True and specs[-2]["strength"] is None
    assert specs[-1]["long_prompt"] == "chunk"
