"""Any number of API processes on one Redis (issue 12, item 6): a batch's finish — manifest and
webhook — happens exactly once, even when the API process finishing it is killed mid-finish.

Three real `sdfarm api` processes, one real worker on the tiny model, SeaweedFS storage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from producer.processes import ManagedProcess
from producer.webhooks import DELIVERY_HEADER, delivery_id
from shared.ledger import Ledger
from shared.storage import open_storage
from tests.faults.api_processes import (
    FINISH_ENV,
    api_process,
    manifests_stored,
    owner_process,
    wait_mid_finish,
    wait_settled,
)
from tests.fixtures_api import API_KEY, WEBHOOK_SECRET
from tests.fixtures_farm import FarmEnv
from tests.hook_receiver import receiving

JOBS = [
    {"prompt": f"a lighthouse, take {i}", "width": 64, "height": 64, "steps": 2} for i in range(3)
]


@pytest.fixture
def three_apis(farm_env: FarmEnv) -> Iterator[tuple[list[ManagedProcess], list[str]]]:
    """Three API processes on the farm's Redis and store, each holding a finish for 3 s."""
    env = (
        farm_env.env
        | FINISH_ENV
        | {
            "SDFARM_API_KEYS": API_KEY,
            "SDFARM_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "SDFARM_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
        }
    )
    started = [api_process(f"api-{i}", env, farm_env.log_dir) for i in range(3)]
    processes = [process for process, _ in started]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_ready(90)
        yield processes, [url for _, url in started]
    finally:
        for process in processes:
            process.stop()


def test_an_api_process_killed_mid_finish_leaves_one_manifest_and_one_webhook(
    farm_env: FarmEnv, three_apis: tuple[list[ManagedProcess], list[str]]
) -> None:
    processes, urls = three_apis
    settings = farm_env.settings
    ledger = Ledger(
        redis.Redis.from_url(settings.redis_url), status_ttl_s=3600, lease_s=settings.lease_s
    )
    farm_env.start_worker()
    farm_env.wait_for_workers(1)
    with receiving() as receiver:
        # Given a batch with a callback URL, submitted to one of three API processes
        body = "".join(json.dumps(job) + "\n" for job in JOBS)
        response = httpx.post(
            f"{urls[0]}/v1/batches",
            content=body.encode(),
            params={"callback_url": receiver.url},
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/x-ndjson"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        batch_id = response.json()["batch_id"]
        # When the process finishing it is killed after storing the manifest, before the webhook
        owner = wait_mid_finish(ledger, batch_id, timeout_s=240)
        killed = owner_process(owner, processes)
        killed.kill()
        killed_at = time.monotonic()
        wait_settled(ledger, batch_id, receiver, timeout_s=60)
    # Then another process took the finish over, after the claim lapsed
    survivors = [p for p in processes if p is not killed]
    assert any("manifest stored already" in p.log_path.read_text() for p in survivors)
    assert receiver.posts[0].at - killed_at >= 3
    # And the manifest was stored once, and is there, one line per job
    assert manifests_stored(processes, batch_id) == 1
    storage = open_storage(
        farm_env.settings.storage_url, endpoint_url=farm_env.settings.s3_endpoint_url
    )
    key = ledger.batch(batch_id).manifest
    assert key is not None
    lines = storage.get(key).decode().splitlines()
    assert [json.loads(line)["state"] for line in lines] == ["succeeded"] * len(JOBS)
    # And exactly one webhook came, with the batch's fixed delivery id
    assert len(receiver.posts) == 1
    post = receiver.posts[0]
    assert post.headers[DELIVERY_HEADER] == delivery_id(batch_id, "batch.finished")
    assert json.loads(post.body)["manifest"]["key"] == key
    ledger.redis.close()
