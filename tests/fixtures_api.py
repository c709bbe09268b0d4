"""An API over real HTTP on the session's Redis and S3 store, with keys, and no workers.

Tests that need a worker start one from `tests.fixtures_farm`; these fixtures are for what the
front door does on its own. A test that plays the worker's part does it through the real ledger,
exactly as `worker.chunk` does (claim, then succeed or fail with the same fields).

Registered for every test module by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from producer.services import S3Service
from shared.config import Settings
from shared.errors import FailureReason
from shared.jobs import JobState
from shared.ledger import Ledger

API_KEY = "test-key-" + "k" * 24
WEBHOOK_SECRET = "test-webhook-secret"


@dataclass
class Api:
    """A running API: its URL, settings, an authorised httpx client and the ledger behind it."""

    url: str
    settings: Settings
    http: httpx.Client
    ledger: Ledger

    def ndjson(self, jobs: list[dict[str, Any]], **params: Any) -> httpx.Response:
        body = "".join(json.dumps(job) + "\n" for job in jobs)
        return self.http.post(
            "/v1/batches",
            content=body.encode(),
            params=params,
            headers={"Content-Type": "application/x-ndjson"},
        )

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            time.sleep(0.05)

    def render_as_worker(
        self,
        job_id: str,
        *,
        worker: str = "w-test",
        fail: str | None = None,
        reason: FailureReason = FailureReason.RENDER_FAILED,
        seconds: float = 0.2,
    ) -> None:
        """Play a worker through the ledger: claim the job, then succeed (or fail, with `reason`
        as its code, as a worker records it) it."""
        self.ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": worker})
        if fail is not None:
            fields = {"error": fail, "reason": reason.value}
            self.ledger.force(job_id, [JobState.RUNNING], JobState.FAILED, fields)
            return
        result = {
            "key": f"x/{job_id}.png",
            "uri": f"s3://b/x/{job_id}.png",
            "bytes": 10,
            "thumbnail_key": f"x/thumbs/{job_id}.webp",  # as a worker with thumbnails on writes
        }
        timings = {"text_encoder": 0.0, "unet": seconds, "vae": 0.0, "batch_rows": 1}
        self.ledger.force(
            job_id, [JobState.RUNNING], JobState.SUCCEEDED, {"result": result, "timings": timings}
        )


def api_settings(redis_url: str, s3: S3Service, **overrides: Any) -> Settings:
    """Settings of a keyed API on the test services; the model path is never loaded here."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "storage_url": f"s3://{s3.bucket}/api-{secrets.token_hex(4)}",
        "s3_endpoint_url": s3.endpoint_url,
        "models": {"tiny": "/nonexistent/tiny"},
        "api_keys": [API_KEY],
        "webhook_secret": WEBHOOK_SECRET,
        # The tests' webhook receivers listen on 127.0.0.1, which the farm refuses by default.
        "webhook_allow_networks": "127.0.0.0/8",
    }
    return Settings(**(values | overrides))


@pytest.fixture
def start_api(
    redis_url: str,
    s3_service: S3Service,
    serve_api: Callable[[Settings], str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., Api]]:
    """Start an API with setting overrides; returns an `Api`."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_service.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_service.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_service.region)
    opened: list[Api] = []

    def start(**overrides: Any) -> Api:
        settings = api_settings(redis_url, s3_service, **overrides)
        url = serve_api(settings)
        http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
        )
        ledger = Ledger(
            redis.Redis.from_url(redis_url),
            status_ttl_s=settings.status_ttl_s,
            lease_s=settings.lease_s,
        )
        opened.append(Api(url=url, settings=settings, http=http, ledger=ledger))
        return opened[-1]

    yield start
    for api in opened:
        api.http.close()
        api.ledger.redis.close()


@pytest.fixture
def api(start_api: Callable[..., Api]) -> Api:
    """An API with default settings (keys on, webhook secret set)."""
    return start_api()
