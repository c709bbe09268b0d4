"""The front door: keys, big NDJSON batches and their limits, idempotency, priority, paging."""

from __future__ import annotations

import json
import time

import httpx
import redis

from shared.keys import Keys
from tests.fixtures_api import API_KEY, Api

JOB = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4}


def test_every_v1_route_needs_the_key_and_healthz_does_not(api: Api) -> None:
    # Given an API with keys configured
    # When routes are called without a key, with a wrong one, and with the right one
    bare = httpx.get(f"{api.url}/v1/batches")
    wrong = httpx.get(f"{api.url}/v1/workers", headers={"Authorization": "Bearer nope"})
    right = api.http.get("/v1/workers")
    health = httpx.get(f"{api.url}/healthz")
    # Then the first two are 401 with a one-line reason, the others succeed
    assert bare.status_code == 401
    assert bare.json()["error"] == "missing API key: send `Authorization: Bearer KEY`"
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "wrong API key"
    assert right.status_code == 200
    assert health.status_code == 200


def test_a_key_in_the_query_string_is_refused_and_points_to_the_header(api: Api) -> None:
    # When a client puts the key in the URL
    response = httpx.get(f"{api.url}/v1/workers", params={"api_key": API_KEY})
    # Then it is refused before anything else, saying where the key goes
    assert response.status_code == 400
    assert "Authorization: Bearer KEY" in response.json()["error"]
    assert "`api_key`" in response.json()["error"]


def test_5000_jobs_as_ndjson_are_accepted_in_seconds_and_all_queued(api: Api) -> None:
    # Given 5,000 jobs, one JSON object a line
    jobs = [{**JOB, "prompt": f"a lighthouse number {i}", "seed": i} for i in range(5000)]
    # When they are posted as NDJSON
    started = time.perf_counter()
    response = api.ndjson(jobs, priority=7)
    elapsed = time.perf_counter() - started
    print(f"\n5,000 NDJSON jobs accepted in {elapsed:.2f} s")
    # Then the batch is accepted quickly, every job is queued with its seed, in order
    assert response.status_code == 201, response.text
    body = response.json()
    assert len(body["job_ids"]) == 5000
    assert elapsed < 10
    batch = api.http.get(f"/v1/batches/{body['batch_id']}").json()
    assert batch["total"] == 5000
    assert batch["counts"]["queued"] == 5000
    assert batch["priority"] == 7
    assert api.ledger.job(body["job_ids"][4321])["spec"]["seed"] == 4321


def test_a_body_over_the_size_limit_is_413_naming_the_setting(start_api) -> None:
    # Given an API that takes bodies of at most 2 KiB
    api = start_api(max_body_bytes=2048)
    # When a bigger NDJSON body arrives
    response = api.ndjson([{**JOB, "prompt": "x" * 100}] * 40)
    # Then it is refused with 413, naming the limit and its setting, and nothing is written
    assert response.status_code == 413
    assert "2048 bytes (setting max_body_bytes)" in response.json()["error"]
    assert api.ledger.redis.zcard(Keys().batches()) == 0


def test_too_many_jobs_is_422_naming_the_setting(start_api) -> None:
    # Given an API that takes at most 10 jobs a batch
    api = start_api(max_jobs_per_batch=10)
    # When 11 arrive
    response = api.ndjson([JOB] * 11)
    # Then the refusal names the limit and the setting
    assert response.status_code == 422
    assert "at most 10 jobs (setting max_jobs_per_batch)" in response.json()["error"]
    assert api.ledger.redis.zcard(Keys().batches()) == 0


def test_a_too_long_prompt_is_422_naming_the_line_and_the_limit(start_api) -> None:
    # Given an API that takes prompts of at most 50 characters
    api = start_api(max_prompt_chars=50)
    # When the third line holds a longer one
    response = api.ndjson([JOB, JOB, {**JOB, "prompt": "y" * 51}])
    # Then the refusal names the job, the field, the size and the setting
    assert response.status_code == 422
    body = response.json()
    assert "job 2, field `prompt`: prompt is 51 characters; at most 50" in body["error"]
    assert body["problems"][0]["line"] == 3


def test_a_line_that_is_not_json_is_422_naming_the_line(api: Api) -> None:
    body = json.dumps(JOB) + "\n" + '{"prompt": "unclosed\n'
    response = api.http.post(
        "/v1/batches", content=body, headers={"Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 422
    assert response.json()["error"].startswith("line 2: not valid JSON")


def test_a_repeated_idempotency_key_returns_the_first_batch(api: Api) -> None:
    # Given a submission with an Idempotency-Key
    headers = {"Idempotency-Key": "nightly-2024-06-01"}
    first = api.http.post("/v1/batches", json={"prompts": ["a", "b"]}, headers=headers)
    # When the same submission is sent again (a client retrying after a timeout)
    again = api.http.post("/v1/batches", json={"prompts": ["a", "b"]}, headers=headers)
    # Then the first batch comes back, marked as a replay, and nothing was queued twice
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json() == {**first.json(), "replayed": True}
    assert api.ledger.redis.zcard(Keys().batches()) == 1
    # And the same key with a different body is refused rather than silently replayed
    other = api.http.post("/v1/batches", json={"prompts": ["c"]}, headers=headers)
    assert other.status_code == 422
    assert "used for a different body" in other.json()["error"]


def test_priority_is_validated_with_its_range_and_stored_on_the_batch(api: Api) -> None:
    refused = api.http.post("/v1/batches", json={"prompts": ["a"], "priority": 12})
    assert refused.status_code == 422
    assert refused.json()["error"] == "`priority`: Input should be less than or equal to 9 (got 12)"
    accepted = api.http.post("/v1/batches", json={"prompts": ["a"], "priority": 9})
    batch_id = accepted.json()["batch_id"]
    assert api.ledger.batch(batch_id)["priority"] == "9"
    assert api.http.get(f"/v1/batches/{batch_id}").json()["priority"] == 9


def test_paging_with_a_state_filter_returns_only_that_state_across_pages(api: Api) -> None:
    # Given a batch of 30 jobs where every third one failed
    ids = api.http.post("/v1/batches", json={"prompts": [f"p{i}" for i in range(30)]}).json()
    failed = ids["job_ids"][::3]
    for job_id in failed:
        api.render_as_worker(job_id, fail="render failed: boom")
    # When the failed jobs are paged 4 at a time
    seen, cursor, pages = [], 0, 0
    while cursor is not None:
        page = api.http.get(
            f"/v1/batches/{ids['batch_id']}/jobs",
            params={"state": "failed", "limit": 4, "cursor": cursor},
        ).json()
        seen += [job["job_id"] for job in page["jobs"]]
        cursor, pages = page["next_cursor"], pages + 1
    # Then every page is full until the last, and all 10 failed jobs come back once, in order
    assert seen == failed
    assert pages == 3
    assert all(
        job["state"] == "failed" and job["error"] == "render failed: boom"
        for job in api.http.get(
            f"/v1/batches/{ids['batch_id']}/jobs", params={"state": "failed", "limit": 4}
        ).json()["jobs"]
    )


def test_a_body_that_is_neither_json_nor_ndjson_is_415(api: Api) -> None:
    response = api.http.post("/v1/batches", content="a cat", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert "application/x-ndjson" in response.json()["error"]


def test_batches_are_listed_newest_first(api: Api) -> None:
    first = api.http.post("/v1/batches", json={"prompts": ["a"]}).json()["batch_id"]
    second = api.http.post("/v1/batches", json={"prompts": ["b"]}).json()["batch_id"]
    listing = api.http.get("/v1/batches").json()
    assert [b["batch_id"] for b in listing["batches"]] == [second, first]
    assert redis.Redis.from_url(api.settings.redis_url).zscore(Keys().active_batches(), first)


def test_an_unknown_query_parameter_is_refused_not_ignored(api: Api) -> None:
    response = api.http.get("/v1/batches", params={"limt": 5})
    assert response.status_code == 422
    assert (
        response.json()["error"]
        == "unknown query parameter 'limt'; /v1/batches takes: cursor, limit"
    )
