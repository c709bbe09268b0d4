"""Security basics (issue 5, item 7), on a real local farm (`sdfarm up`'s LocalFarm).

Credentials (the API key, the S3 secret) never appear in API responses, job records, logs or
image metadata; presigned URLs expire after the configured time; the bucket refuses anonymous
reads; the API refuses keys in query strings.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from producer.client import FarmClient
from producer.local import LocalFarm
from shared.keys import Keys
from shared.metadata import read_png_metadata

PRESIGN_EXPIRY_S = 3


@pytest.fixture(scope="module")
def farm(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    redis_server_bin: str,
    weed_bin: str,
) -> Iterator[LocalFarm]:
    local = LocalFarm(
        state_dir=tmp_path_factory.mktemp("security"),
        workers=1,
        models={"tiny": str(tiny_model_dir)},
        extra_env={"SDFARM_PRESIGN_EXPIRY_S": str(PRESIGN_EXPIRY_S), "OMP_NUM_THREADS": "1"},
    ).start()
    try:
        local.wait_for_workers(300)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def finished_job(farm: LocalFarm) -> str:
    with FarmClient(farm.api_url, farm.api_key) as client:
        submitted = client.submit(
            prompts=["a lighthouse at dusk"], defaults={"width": 64, "height": 64, "steps": 2}
        )
        client.wait(submitted["batch_id"], timeout_s=300)
    job_id: str = submitted["job_ids"][0]
    return job_id


def _secrets(farm: LocalFarm) -> dict[str, str]:
    assert farm.s3 is not None
    return {"API key": farm.api_key, "S3 secret key": farm.s3.secret_key}


def test_no_credential_appears_in_responses_records_logs_or_images(
    farm: LocalFarm, finished_job: str
) -> None:
    # Given a farm that rendered a job
    assert farm.s3 is not None
    batch_id = finished_job.rsplit("-", 1)[0]
    seen: dict[str, str] = {}
    # When everything a user or an operator can read is gathered
    with FarmClient(farm.api_url, farm.api_key) as client:
        for path in (
            "/healthz",
            "/openapi.json",
            f"/v1/batches/{batch_id}",
            f"/v1/batches/{batch_id}/jobs",
            f"/v1/jobs/{finished_job}",
            "/v1/workers",
        ):
            seen[f"GET {path}"] = client.http.get(path).text
        seen["redirect"] = client.http.get(f"/v1/jobs/{finished_job}/image").headers["location"]
        image = client.image(finished_job)
    for name, value in read_png_metadata(image).items():
        seen[f"PNG chunk {name}"] = value
    with contextlib.closing(redis.Redis.from_url(farm.redis.url)) as ledger:
        for key in ledger.scan_iter(f"{Keys().prefix}:*"):
            if ledger.type(key) == b"hash":
                seen[f"redis {key.decode()}"] = str(ledger.hgetall(key))
    for log in sorted(farm.log_dir.glob("*.log")):
        seen[f"log {log.name}"] = log.read_text(errors="replace")
    # Then no secret is in any of it
    for what, secret in _secrets(farm).items():
        leaks = [name for name, text in seen.items() if secret in text]
        assert not leaks, f"the {what} appears in {leaks}"
    # And the S3 access key id appears only where SigV4 puts it: in the presigned URL
    leaks = [name for name, text in seen.items() if farm.s3.access_key in text]
    assert leaks == ["redirect"], leaks


def test_presigned_urls_expire_after_the_configured_time(
    farm: LocalFarm, finished_job: str
) -> None:
    # Given the image route of a finished job, on a farm whose URLs live 3 s
    with FarmClient(farm.api_url, farm.api_key) as client:
        location = client.http.get(f"/v1/jobs/{finished_job}/image").headers["location"]
    assert f"X-Amz-Expires={PRESIGN_EXPIRY_S}" in location
    # When the URL is used at once, Then it works; When used after its expiry, Then it is refused
    assert httpx.get(location).status_code == 200
    time.sleep(PRESIGN_EXPIRY_S + 1.5)
    assert httpx.get(location).status_code == 403


def test_the_bucket_refuses_anonymous_reads_and_listings(
    farm: LocalFarm, finished_job: str
) -> None:
    # Given an object in the bucket
    assert farm.s3 is not None
    with FarmClient(farm.api_url, farm.api_key) as client:
        key = client.job(finished_job)["result"]["key"]
    base = f"{farm.s3.endpoint_url}/{farm.s3.bucket}"
    # When it is read or listed without a signature, Then the store refuses
    assert httpx.get(f"{base}/{key}").status_code in (401, 403)
    assert httpx.get(f"{base}?list-type=2").status_code in (401, 403)


@pytest.mark.parametrize("name", ["api_key", "token", "access_token", "key"])
def test_an_api_key_in_a_query_string_is_refused(
    farm: LocalFarm, finished_job: str, name: str
) -> None:
    # When a request carries the key in its URL (even beside a good header)
    headers = {"Authorization": f"Bearer {farm.api_key}"}
    url = f"{farm.api_url}/v1/jobs/{finished_job}"
    answer = httpx.get(url, params={name: farm.api_key}, headers=headers)
    # Then it is refused, and told where the key goes
    assert answer.status_code == 400
    assert "Authorization: Bearer" in answer.json()["error"]
    assert farm.api_key not in answer.text
    # And the API's access log shows the request with the key redacted
    log = farm.api.log_path
    deadline = time.monotonic() + 10
    while f"{name}=REDACTED" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no redacted {name} in {log}"
        time.sleep(0.1)
    assert farm.api_key not in log.read_text(errors="replace")
