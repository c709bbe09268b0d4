"""Bad input is refused at the door with a message that names the field and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import redis

from shared.config import Settings
from shared.keys import Keys


@pytest.fixture
def api(redis_url: str, serve_api, tmp_path) -> httpx.Client:
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path}",
        models={"tiny": "/models/tiny", "sd15": "/models/sd15"},
    )
    with httpx.Client(base_url=serve_api(settings)) as client:
        yield client


def _nothing_enqueued(redis_url: str) -> bool:
    client = redis.Redis.from_url(redis_url)
    return not client.keys(f"{Keys().prefix}:job:*") and not client.keys(
        f"{Keys().prefix}:pending:*"
    )


@pytest.mark.parametrize(
    ("job", "field", "words"),
    [
        ({"prompt": "x", "width": 500}, "width", "multiple of 8 but is 500"),
        ({"prompt": "x", "width": 10000}, "width", "less than or equal to 2048"),
        ({"prompt": "x", "steps": 0}, "steps", "greater than or equal to 1"),
        ({"prompt": "x", "steps": 100000}, "steps", "less than or equal to 150"),
        ({"prompt": "x", "guidance": "high"}, "guidance", "valid number"),
        ({"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "x", "scheduler": "warp"}, "scheduler", "'lms'"),
        ({"prompt": "x", "model": "sdxl"}, "model", "unknown model 'sdxl'; known: tiny, sd15"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "x", "colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"steps": 20}, "prompt", "Field required"),
        ({"prompt": 42}, "prompt", "valid string"),
    ],
)
def test_a_bad_field_is_refused_with_its_name_and_the_allowed_range(
    api: httpx.Client, redis_url: str, job: dict, field: str, words: str
) -> None:
    response = api.post("/v1/batches", json={"jobs": [{"prompt": "fine"}, job]})
    assert response.status_code == 422, response.text
    body = response.json()
    problem = body["problems"][0]
    assert problem["job"] == 1 and problem["field"] == field
    assert words in problem["message"], problem
    assert body["error"].startswith(f"job 1, field `{field}`")
    assert _nothing_enqueued(redis_url)


def test_a_prompt_longer_than_the_setting_is_refused(api: httpx.Client, redis_url: str) -> None:
    response = api.post("/v1/batches", json={"prompts": ["y" * 5000]})
    assert response.status_code == 422
    assert "at most 4000 are allowed" in response.json()["error"]
    assert _nothing_enqueued(redis_url)


def test_a_body_with_both_jobs_and_prompts_is_refused(api: httpx.Client) -> None:
    response = api.post("/v1/batches", json={"prompts": ["a"], "jobs": [{"prompt": "b"}]})
    assert response.status_code == 422
    assert "exactly one of `jobs`" in response.json()["error"]


def test_broken_json_is_refused_without_a_stack_trace(api: httpx.Client) -> None:
    response = api.post(
        "/v1/batches", content=b'{"prompts": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "Traceback" not in response.text and "JSON" in response.json()["error"]


def test_unknown_and_malformed_ids_are_404(api: httpx.Client) -> None:
    assert api.get("/v1/batches/b0123456789abcdef0123").status_code == 404
    assert api.get("/v1/jobs/b0123456789abcdef0123-4").status_code == 404
    response = api.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd")
    assert response.status_code == 404 and "routes are listed" in response.json()["error"]
    response = api.get("/v1/jobs/..passwd")
    assert response.status_code == 404 and "job ids look like" in response.json()["error"]


def test_defaults_fill_each_prompt_and_seeds_are_fixed_at_submit(api: httpx.Client) -> None:
    response = api.post(
        "/v1/batches", json={"prompts": ["a", "b"], "defaults": {"steps": 12, "model": "sd15"}}
    )
    assert response.status_code == 201, response.text
    job_ids = response.json()["job_ids"]
    jobs = [api.get(f"/v1/jobs/{j}").json() for j in job_ids]
    assert [j["spec"]["steps"] for j in jobs] == [12, 12]
    assert [j["spec"]["model"] for j in jobs] == ["sd15", "sd15"]
    assert all(isinstance(j["spec"]["seed"], int) for j in jobs)
    assert jobs[0]["spec"]["seed"] != jobs[1]["spec"]["seed"]
    assert jobs[0]["state"] == "queued" and jobs[0]["progress"] == {"step": 0, "steps": 12}


def test_importing_the_api_and_the_client_does_not_import_torch() -> None:
    code = (
        "import sys, producer.api, producer.client, producer.cli, producer.dispatcher;"
        "heavy = ('torch', 'diffusers', 'transformers', 'worker');"
        "bad = sorted(m for m in heavy if m in sys.modules);"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_prompt_a1111_syntax_cannot_read_is_refused_at_submit(
    api: httpx.Client, redis_url: str, field: str
) -> None:
    response = api.post("/v1/batches", json={"jobs": [{"prompt": "x", field: "a (cat:1.2.3)"}]})
    assert response.status_code == 422, response.text
    message = response.json()["problems"][0]["message"]
    assert "weight '1.2.3' at character 6" in message and 'prompt_syntax "plain"' in message
    assert _nothing_enqueued(redis_url)
    plain = {"prompt": "x", field: "a (cat:1.2.3)", "prompt_syntax": "plain"}
    assert api.post("/v1/batches", json={"jobs": [plain]}).status_code == 201
