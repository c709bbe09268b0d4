"""Tenant quotas at submit, against the real API and Redis: a tenant's `max_jobs_per_batch` and
`max_priority` are 422s naming the limit, its `submits_per_minute` a 429 with `Retry-After`;
a refused submit writes nothing and costs no budget; one tenant's limit never touches another's,
and an admin has none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from producer.client import FarmClient
from shared.errors import RateLimited
from shared.keys import Keys
from shared.ledger.rates import SubmitRates
from tests.fixtures_api import Api
from tests.test_tenants import SMALL, _client, _digest

ALPHA_KEY = "quota-alpha-" + "a" * 24
BETA_KEY = "quota-beta-" + "b" * 24
OPS_KEY = "quota-ops-" + "c" * 24


@dataclass
class Limited:
    """A farm whose tenants file limits alpha (3 jobs, priority 0-6, 2 submits a minute) and
    beta (2 submits a minute), and whose operator has no limits."""

    api: Api
    alpha: httpx.Client
    beta: httpx.Client
    ops: httpx.Client

    def written(self) -> tuple[int, int, dict[str, int]]:
        """(job and batch keys, batches listed, jobs submitted per tenant): what a refused
        submit must leave as it was (the dispatcher moves other keys meanwhile)."""
        ledger, keys = self.api.ledger, Keys()
        records = [*ledger.redis.scan_iter(keys.job("*")), *ledger.redis.scan_iter(keys.batch("*"))]
        return len(records), ledger.stats.batch_count(), ledger.stats.submitted()


@pytest.fixture
def limited(start_api: Callable[..., Api], tmp_path: Path) -> Iterator[Limited]:
    path = tmp_path / "tenants.toml"
    path.write_text(
        f"""
[tenants.alpha]
keys_sha256 = ["{_digest(ALPHA_KEY)}"]
max_jobs_per_batch = 3
max_priority = 6
submits_per_minute = 2

[tenants.beta]
keys_sha256 = ["{_digest(BETA_KEY)}"]
submits_per_minute = 2

[tenants.ops]
role = "admin"
keys_sha256 = ["{_digest(OPS_KEY)}"]
max_priority = 1
submits_per_minute = 1
"""
    )
    api = start_api(api_keys=[], tenants_file=path)
    clients = [_client(api.url, key) for key in (ALPHA_KEY, BETA_KEY, OPS_KEY)]
    yield Limited(api, *clients)
    for client in clients:
        client.close()


def _json(client: httpx.Client, prompts: int = 1, **fields: Any) -> httpx.Response:
    body = {"prompts": [f"a lighthouse {i}" for i in range(prompts)], "defaults": SMALL, **fields}
    return client.post("/v1/batches", json=body)


def _ndjson(client: httpx.Client, jobs: int = 1, **params: Any) -> httpx.Response:
    lines = "".join(
        f'{{"prompt": "a harbour {i}", "width": 64, "height": 64}}\n' for i in range(jobs)
    )
    headers = {"Content-Type": "application/x-ndjson"}
    return client.post("/v1/batches", content=lines.encode(), params=params, headers=headers)


# -- max_jobs_per_batch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("send", "size"),
    [(_json, "this batch has 4"), (_ndjson, "this batch has more than 3")],
    ids=["json", "ndjson"],
)
def test_a_batch_over_the_tenants_max_jobs_is_422_naming_the_limit_and_writes_nothing(
    limited: Limited, send: Callable[..., httpx.Response], size: str
) -> None:
    # Given alpha, whose batches may hold at most 3 jobs
    before = limited.written()
    # When it sends 4
    refused = send(limited.alpha, 4)
    # Then it is a 422 naming the limit, the tenant's setting and the batch's size
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert "tenant 'alpha' may put at most 3 jobs in a batch" in error
    assert "max_jobs_per_batch is 3" in error
    assert size in error
    # And nothing was written
    assert limited.written() == before
    # And a batch of 3 is accepted
    assert send(limited.alpha, 3).status_code == 201


def test_the_farms_max_jobs_applies_where_it_is_below_the_tenants(
    start_api: Callable[..., Api], tmp_path: Path
) -> None:
    # Given a farm taking 2 jobs a batch, and a tenant whose own limit (3) is higher
    path = tmp_path / "tenants.toml"
    path.write_text(
        f'[tenants.alpha]\nkeys_sha256 = ["{_digest(ALPHA_KEY)}"]\nmax_jobs_per_batch = 3\n'
    )
    api = start_api(api_keys=[], tenants_file=path, max_jobs_per_batch=2)
    with _client(api.url, ALPHA_KEY) as alpha:
        # When the tenant sends 3
        refused = _json(alpha, 3)
    # Then the farm's setting refuses it, by name
    assert refused.status_code == 422
    assert "at most 2 jobs (setting max_jobs_per_batch)" in refused.json()["error"]
    assert api.ledger.stats.batch_count() == 0


# -- max_priority ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "send",
    [lambda c, p: _json(c, priority=p), lambda c, p: _ndjson(c, priority=p)],
    ids=["json", "ndjson"],
)
def test_a_priority_above_the_tenants_max_is_422_naming_the_range(
    limited: Limited, send: Callable[[httpx.Client, int], httpx.Response]
) -> None:
    # Given alpha, which may ask for priorities 0-6
    before = limited.written()
    # When it asks for 7
    refused = send(limited.alpha, 7)
    # Then it is a 422 naming the allowed range and the setting, and nothing was written
    assert refused.status_code == 422, refused.text
    body = refused.json()
    assert "priority 7 is above what tenant 'alpha' may ask for: 0-6" in body["error"]
    assert "max_priority is 6" in body["error"]
    assert body["problems"][0]["field"] == "priority"
    assert limited.written() == before
    # And 6 is accepted
    assert send(limited.alpha, 6).status_code == 201


# -- submits_per_minute ---------------------------------------------------------------------------


def test_a_submit_over_the_tenants_rate_is_429_with_retry_after(limited: Limited) -> None:
    # Given alpha, allowed 2 submits a minute, which has sent 2
    assert [_json(limited.alpha).status_code for _ in range(2)] == [201, 201]
    before = limited.written()
    # When it sends a third, as JSON and as NDJSON
    refused = [_json(limited.alpha), _ndjson(limited.alpha)]
    # Then each is a 429 naming the limit, with the seconds until the window frees
    for response in refused:
        assert response.status_code == 429, response.text
        assert "tenant 'alpha' may submit 2 batches a minute" in response.json()["error"]
        assert "submits_per_minute is 2" in response.json()["error"]
        assert 1 <= int(response.headers["Retry-After"]) <= 60
    # And nothing was written
    assert limited.written() == before
    # And the Python client raises RateLimited, carrying the wait
    with FarmClient(limited.api.url, ALPHA_KEY) as client, pytest.raises(RateLimited) as raised:
        client.submit(prompts=["a"], defaults=SMALL)
    assert 1 <= raised.value.retry_after_s <= 60


def test_one_tenants_rate_limit_leaves_other_tenants_and_admins_alone(limited: Limited) -> None:
    # Given alpha, over its rate
    for _ in range(2):
        _json(limited.alpha)
    assert _json(limited.alpha).status_code == 429
    # When beta and the operator submit (the operator's file lists limits too, but it is an admin)
    beta = [_json(limited.beta).status_code for _ in range(2)]
    ops = [_json(limited.ops, priority=9).status_code for _ in range(3)]
    # Then beta has its own full budget, and the admin is not limited at all
    assert beta == [201, 201]
    assert ops == [201, 201, 201]


def test_a_refused_submit_uses_none_of_the_tenants_budget(limited: Limited) -> None:
    # Given alpha, allowed 2 submits a minute, whose first three are refused as invalid
    assert _json(limited.alpha, priority=7).status_code == 422
    assert _json(limited.alpha, 4).status_code == 422
    assert _ndjson(limited.alpha, 1, priority=8).status_code == 422
    # When it then sends two valid batches
    accepted = [_json(limited.alpha).status_code for _ in range(2)]
    # Then both are accepted: only accepted batches count against the rate
    assert accepted == [201, 201]


def test_an_idempotency_replay_is_answered_even_over_the_rate(limited: Limited) -> None:
    # Given alpha's two submits this minute, the first with an Idempotency-Key
    body = {"prompts": ["a kite"], "defaults": SMALL}
    headers = {"Idempotency-Key": "run-1"}
    first = limited.alpha.post("/v1/batches", json=body, headers=headers)
    assert _json(limited.alpha).status_code == 201
    # When it repeats the first request
    again = limited.alpha.post("/v1/batches", json=body, headers=headers)
    # Then it gets its first batch back: a replay is not a new submit
    assert again.status_code == 200, again.text
    assert again.json()["batch_id"] == first.json()["batch_id"]


def test_the_rate_window_is_timed_by_redis_and_frees_when_it_ends(redis_url: str) -> None:
    # Given a tenant allowed one submit in a 300 ms window, which has used it
    client = redis.Redis.from_url(redis_url)
    rates = SubmitRates(client, Keys())
    assert rates.check("alpha", limit=1, window_s=0.3, take=True).allowed
    # When it asks again at once, and again after the window
    at_once = rates.check("alpha", limit=1, window_s=0.3, take=True)
    time.sleep(0.35)
    later = rates.check("alpha", limit=1, window_s=0.3, take=True)
    client.close()
    # Then the first is refused with the time left in the window, the second allowed
    assert not at_once.allowed
    assert 0 < at_once.retry_after_s <= 0.3
    assert later.allowed
