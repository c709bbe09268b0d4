"""Tenants and isolation, against the real API, Redis and SeaweedFS (and a real worker where a
rendered image is needed): every key belongs to a tenant, which sees only its own batches and
jobs; another tenant's id is answered exactly like an id that does not exist; lists, the
dashboard's data, /v1/workers and /metrics are scoped the same way; an admin key sees all. Keys
come from SDFARM_API_KEYS / SDFARM_ADMIN_KEYS or a tenants file of SHA-256 digests, and a
configuration that cannot work stops the API at startup with a message that says what to fix.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.api import create_app
from producer.client import FarmClient
from producer.tenants import Role, load_tenants
from shared.config import Settings
from shared.errors import ConfigError
from shared.ids import job_id_for, new_batch_id
from shared.jobs import JobState
from shared.keys import Keys
from shared.ledger.workers import publish_heartbeat
from tests.fixtures_api import Api
from tests.fixtures_farm import ROOT, FarmEnv

ALPHA_KEY = "alpha-key-" + "a" * 24
BETA_KEY = "beta-key-" + "b" * 24
ADMIN_KEY = "admin-key-" + "c" * 24
KEYS = {"api_keys": [f"alpha:{ALPHA_KEY}", f"beta:{BETA_KEY}"], "admin_keys": [ADMIN_KEY]}
SMALL = {"width": 64, "height": 64, "steps": 2}

# Every /v1 route that takes an id: (method, path, which id). A test below holds this table to
# the API's own route list, so a new route cannot be added without its isolation check.
ID_ROUTES = [
    ("GET", "/v1/batches/{batch_id}", "batch"),
    ("GET", "/v1/batches/{batch_id}/jobs", "batch"),
    ("GET", "/v1/batches/{batch_id}/manifest", "batch"),
    ("DELETE", "/v1/batches/{batch_id}", "batch"),
    ("POST", "/v1/batches/{batch_id}/retry", "batch"),
    ("GET", "/v1/jobs/{job_id}", "job"),
    ("GET", "/v1/jobs/{job_id}/image", "job"),
    ("GET", "/v1/jobs/{job_id}/thumbnail", "job"),
    ("DELETE", "/v1/jobs/{job_id}", "job"),
]


@dataclass
class Tenancy:
    """A keyed API with two tenants and an operator, each with its own client."""

    api: Api
    alpha: httpx.Client
    beta: httpx.Client
    admin: httpx.Client

    def submit(self, client: httpx.Client, prompts: list[str]) -> dict[str, list[str] | str]:
        response = client.post("/v1/batches", json={"prompts": prompts, "defaults": SMALL})
        assert response.status_code == 201, response.text
        body: dict[str, list[str] | str] = response.json()
        return body


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture
def tenancy(start_api: Callable[..., Api]) -> Iterator[Tenancy]:
    api = start_api(**KEYS)
    clients = [_client(api.url, key) for key in (ALPHA_KEY, BETA_KEY, ADMIN_KEY)]
    yield Tenancy(api, *clients)
    for client in clients:
        client.close()


def _call(client: httpx.Client, method: str, path: str) -> httpx.Response:
    return client.request(method, path, follow_redirects=False)


def _assert_same_404(foreign: httpx.Response, missing: httpx.Response, ids: tuple[str, str]):
    """The foreign id's answer is the missing id's, byte for byte but for the id itself."""
    foreign_id, missing_id = ids
    assert foreign.status_code == missing.status_code == 404
    assert foreign.headers["content-type"] == missing.headers["content-type"]
    assert foreign.text == missing.text.replace(missing_id, foreign_id)
    assert missing_id in missing.text  # (the replacement above did replace something)


# -- every route x another tenant's id ------------------------------------------------------------


def test_the_id_table_holds_every_v1_route_that_takes_an_id(tenancy: Tenancy) -> None:
    # Given the API's published routes
    paths = tenancy.api.http.get("/openapi.json").json()["paths"]
    # When those under /v1 that take an id are listed
    published = {
        (method.upper(), path)
        for path, operations in paths.items()
        if path.startswith("/v1/") and "{" in path
        for method in operations
    }
    # Then each one is in the isolation table below, and the table names no other
    assert published == {(method, path) for method, path, _ in ID_ROUTES}


@pytest.mark.parametrize(
    ("method", "path", "kind"), ID_ROUTES, ids=[f"{m} {p}" for m, p, _ in ID_ROUTES]
)
def test_another_tenants_id_is_the_same_404_as_a_missing_one(
    tenancy: Tenancy, method: str, path: str, kind: str
) -> None:
    # Given alpha's batch: one job succeeded (an image), one failed, one still queued
    api = tenancy.api
    batch = tenancy.submit(tenancy.alpha, ["a red fox", "a blue whale", "a green owl"])
    done, failed, queued = batch["job_ids"]
    api.render_as_worker(str(done))
    api.render_as_worker(str(failed), fail="render failed: boom")
    before = api.ledger.batch(str(batch["batch_id"])).counts
    foreign_id = str(batch["batch_id"]) if kind == "batch" else str(done)
    missing_id = new_batch_id() if kind == "batch" else job_id_for(new_batch_id(), 0)
    # When beta calls the route with alpha's id, and with an id that does not exist
    foreign = _call(tenancy.beta, method, path.format(**{f"{kind}_id": foreign_id}))
    missing = _call(tenancy.beta, method, path.format(**{f"{kind}_id": missing_id}))
    # Then both are the same 404, with the same body: nothing tells the two apart
    _assert_same_404(foreign, missing, (foreign_id, missing_id))
    # And alpha's batch is untouched: nothing cancelled, nothing re-queued
    assert api.ledger.batch(str(batch["batch_id"])).counts == before
    assert api.ledger.job(str(queued)).state is JobState.QUEUED
    # And alpha itself, and the admin, get the route's real answer
    for owner in (tenancy.alpha, tenancy.admin):
        answer = _call(owner, method, path.format(**{f"{kind}_id": foreign_id}))
        assert answer.status_code in (200, 307), (answer.status_code, answer.text)


def test_a_missing_id_is_the_same_404_for_an_admin_and_a_tenant(tenancy: Tenancy) -> None:
    # Given an id that does not exist
    missing = new_batch_id()
    # When a tenant and the admin ask for it
    answers = [client.get(f"/v1/batches/{missing}") for client in (tenancy.beta, tenancy.admin)]
    # Then both get the ledger's own 404
    assert [a.status_code for a in answers] == [404, 404]
    assert answers[0].json() == answers[1].json() == {"error": f"no batch {missing!r}"}


# -- lists, workers, the dashboard's data, metrics ------------------------------------------------


def test_the_batch_list_holds_only_the_callers_batches_and_pages_within_them(
    tenancy: Tenancy,
) -> None:
    # Given two batches of alpha's, one of beta's, and one from before tenants (the ledger's
    # default tenant)
    api = tenancy.api
    a1 = tenancy.submit(tenancy.alpha, ["a1"])["batch_id"]
    b1 = tenancy.submit(tenancy.beta, ["b1"])["batch_id"]
    a2 = tenancy.submit(tenancy.alpha, ["a2"])["batch_id"]
    old = new_batch_id()
    api.ledger.create_batch(old, [api.ledger.job(job_id_for(str(a1), 0)).spec])
    # When each lists its batches, alpha one at a time
    first = tenancy.alpha.get("/v1/batches", params={"limit": 1}).json()
    second = tenancy.alpha.get("/v1/batches", params={"limit": 1, "cursor": 1}).json()
    beta = tenancy.beta.get("/v1/batches").json()
    admin = tenancy.admin.get("/v1/batches").json()
    # Then alpha pages through its own two, newest first, and the pages end there
    assert [b["batch_id"] for b in first["batches"]] == [a2]
    assert first["next_cursor"] == 1
    assert [b["batch_id"] for b in second["batches"]] == [a1]
    assert second["next_cursor"] is None
    # And beta sees only its own, the admin sees every tenant's, each batch naming its tenant
    assert [(b["batch_id"], b["tenant"]) for b in beta["batches"]] == [(b1, "beta")]
    assert [(b["batch_id"], b["tenant"]) for b in admin["batches"]] == [
        (old, "default"),
        (a2, "alpha"),
        (b1, "beta"),
        (a1, "alpha"),
    ]


def test_workers_show_only_the_callers_current_jobs(tenancy: Tenancy) -> None:
    # Given a worker rendering one job of alpha's and one of beta's
    api = tenancy.api
    alpha_job = tenancy.submit(tenancy.alpha, ["a lighthouse"])["job_ids"][0]
    beta_job = tenancy.submit(tenancy.beta, ["a harbour"])["job_ids"][0]
    publish_heartbeat(
        api.ledger.redis,
        Keys(),
        "w-1",
        {"models": ["tiny"], "current": [alpha_job, beta_job], "images_done": 7},
        ttl_s=30,
    )
    # When each asks for the live workers
    seen = {
        name: client.get("/v1/workers").json()["workers"]
        for name, client in (
            ("alpha", tenancy.alpha),
            ("beta", tenancy.beta),
            ("admin", tenancy.admin),
        )
    }
    # Then every caller sees the worker, but only its own job among what it renders
    assert {name: [w["worker_id"] for w in workers] for name, workers in seen.items()} == {
        "alpha": ["w-1"],
        "beta": ["w-1"],
        "admin": ["w-1"],
    }
    assert seen["alpha"][0]["current"] == [alpha_job]
    assert seen["beta"][0]["current"] == [beta_job]
    assert seen["admin"][0]["current"] == [alpha_job, beta_job]
    assert seen["beta"][0]["images_done"] == 7


def test_nothing_the_dashboard_reads_for_beta_names_alphas_work(tenancy: Tenancy) -> None:
    # Given alpha's batch with a finished and a failed job, and beta's own batch
    api = tenancy.api
    alpha = tenancy.submit(tenancy.alpha, ["a secret prompt of alpha's", "another of alpha's"])
    api.render_as_worker(str(alpha["job_ids"][0]), worker="w-1")
    api.render_as_worker(str(alpha["job_ids"][1]), worker="w-1", fail="render failed: alpha's")
    publish_heartbeat(
        api.ledger.redis, Keys(), "w-1", {"models": ["tiny"], "current": alpha["job_ids"]}, 30
    )
    beta = tenancy.submit(tenancy.beta, ["a prompt of beta's"])
    # When beta's dashboard polls what it polls (the list, the workers, each batch's finished
    # and failed jobs) and Prometheus scrapes with beta's key
    listing = tenancy.beta.get("/v1/batches", params={"limit": 20})
    texts = [listing.text, tenancy.beta.get("/v1/workers").text]
    for b in listing.json()["batches"]:
        for state in ("succeeded", "failed"):
            params = {"state": state, "limit": 24, "presign": "true"}
            texts.append(tenancy.beta.get(f"/v1/batches/{b['batch_id']}/jobs", params=params).text)
    texts.append(tenancy.beta.get("/metrics").text)
    # Then beta's own batch is there, and nothing of alpha's: no id, no prompt, no tenant name
    seen = "\n".join(texts)
    assert str(beta["batch_id"]) in seen
    assert str(alpha["batch_id"]) not in seen
    assert "alpha" not in seen


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_per_tenant_and_show_a_tenant_only_its_own(tenancy: Tenancy) -> None:
    # Given alpha's batch of three (one rendered in 0.5 s, one failed) and beta's batch of one
    api = tenancy.api
    alpha = tenancy.submit(tenancy.alpha, ["p0", "p1", "p2"])
    api.render_as_worker(str(alpha["job_ids"][0]), seconds=0.5)
    api.render_as_worker(str(alpha["job_ids"][1]), fail="render failed: boom")
    tenancy.submit(tenancy.beta, ["q0"])
    # When the admin, and then beta, scrape /metrics
    admin = _samples(tenancy.admin.get("/metrics").text)
    beta = _samples(tenancy.beta.get("/metrics").text)
    # Then the admin sees each tenant's jobs, submissions, outcomes and render time
    assert admin[("sdfarm_tenant_jobs", (("state", "queued"), ("tenant", "alpha")))] == 1
    assert admin[("sdfarm_tenant_jobs", (("state", "succeeded"), ("tenant", "alpha")))] == 1
    assert admin[("sdfarm_tenant_jobs", (("state", "queued"), ("tenant", "beta")))] == 1
    assert admin[("sdfarm_tenant_jobs_submitted_total", (("tenant", "alpha"),))] == 3
    assert admin[("sdfarm_tenant_jobs_submitted_total", (("tenant", "beta"),))] == 1
    finished = "sdfarm_tenant_jobs_finished_total"
    assert admin[(finished, (("state", "succeeded"), ("tenant", "alpha")))] == 1
    assert admin[(finished, (("state", "failed"), ("tenant", "alpha")))] == 1
    assert admin[("sdfarm_tenant_render_seconds_total", (("tenant", "alpha"),))] == 0.5
    # And the farm-wide series still count everything
    assert admin[("sdfarm_jobs", (("state", "queued"),))] == 2
    # And beta's scrape holds only beta's tenant series
    tenants = {dict(labels).get("tenant") for _, labels in beta} - {None}
    assert tenants == {"beta"}


def test_the_same_idempotency_key_from_another_tenant_is_a_batch_of_its_own(
    tenancy: Tenancy,
) -> None:
    # Given alpha's batch sent with an Idempotency-Key
    body = {"prompts": ["a kite"], "defaults": SMALL}
    headers = {"Idempotency-Key": "nightly-run-1"}
    first = tenancy.alpha.post("/v1/batches", json=body, headers=headers)
    # When beta sends the same body with the same key
    second = tenancy.beta.post("/v1/batches", json=body, headers=headers)
    # Then beta gets a new batch of its own, not alpha's back
    assert first.status_code == second.status_code == 201
    assert second.json()["replayed"] is False
    assert second.json()["batch_id"] != first.json()["batch_id"]
    assert tenancy.beta.get(f"/v1/batches/{second.json()['batch_id']}").json()["tenant"] == "beta"


def test_a_farm_without_keys_stays_open_and_every_caller_sees_everything(
    start_api: Callable[..., Api],
) -> None:
    # Given a farm with no keys at all (local development), and a batch sent without a key
    api = start_api(api_keys=[])
    submitted = httpx.post(f"{api.url}/v1/batches", json={"prompts": ["a"], "defaults": SMALL})
    # When someone without a key lists the batches
    listing = httpx.get(f"{api.url}/v1/batches")
    # Then it works as before tenants: the batch is the default tenant's, and it is listed
    assert submitted.status_code == 201
    assert [(b["batch_id"], b["tenant"]) for b in listing.json()["batches"]] == [
        (submitted.json()["batch_id"], "default")
    ]


# -- configuration: the tenants file, and what stops the API at startup ---------------------------


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_a_tenants_file_of_digests_gives_each_key_its_tenant_role_and_limits(
    start_api: Callable[..., Api], tmp_path: Path
) -> None:
    # Given a tenants file holding only the digests of a tenant's key and an operator's key
    alpha_key, ops_key = "file-alpha-" + "x" * 24, "file-ops-" + "y" * 24
    path = tmp_path / "tenants.toml"
    path.write_text(
        f"""
[tenants.alpha]
keys_sha256 = ["{_digest(alpha_key)}"]
max_queued_jobs = 500
max_jobs_per_batch = 100
max_priority = 6
submits_per_minute = 30
weight = 2.5

[tenants.ops]
role = "admin"
keys_sha256 = ["{_digest(ops_key).upper()}"]
"""
    )
    # When the API starts with it, and each key is used
    api = start_api(api_keys=[], tenants_file=path)
    with _client(api.url, alpha_key) as alpha, _client(api.url, ops_key) as ops:
        mine = alpha.post("/v1/batches", json={"prompts": ["a"], "defaults": SMALL}).json()
        other_batch = new_batch_id()  # another tenant's (the ledger's default one)
        api.ledger.create_batch(other_batch, [api.ledger.job(mine["job_ids"][0]).spec])
        alpha_list = alpha.get("/v1/batches").json()["batches"]
        ops_list = ops.get("/v1/batches").json()["batches"]
        wrong = httpx.get(f"{api.url}/v1/batches", headers={"Authorization": "Bearer nope"})
    # Then alpha's key is tenant alpha, the operator's sees every batch, a wrong key is refused
    assert [b["batch_id"] for b in alpha_list] == [mine["batch_id"]]
    assert {b["batch_id"] for b in ops_list} == {mine["batch_id"], other_batch}
    assert wrong.status_code == 401
    assert alpha_key not in path.read_text()
    # And each tenant's role and limits are read as written (the limits are enforced later)
    tenants = load_tenants(api.settings)
    assert tenants.by_name["ops"].role is Role.ADMIN
    limits = tenants.by_name["alpha"].limits
    assert (limits.max_queued_jobs, limits.max_jobs_per_batch, limits.max_priority) == (500, 100, 6)
    assert (limits.submits_per_minute, limits.weight) == (30, 2.5)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('keys = ["{key}"]', "has `keys`, API keys in clear text"),
        ('api_key = "{key}"', "has `api_key`, API keys in clear text"),
        ('keys_sha256 = ["{key}"]', "keys_sha256[0] is not a SHA-256 digest (64 hex digits)"),
    ],
    ids=["keys", "api_key", "a key where a digest goes"],
)
def test_a_key_in_clear_text_in_the_tenants_file_stops_the_api(
    tmp_path: Path, entry: str, expected: str
) -> None:
    # Given a tenants file that holds a key itself instead of its digest
    key = "clear-text-key-" + "z" * 24
    path = tmp_path / "tenants.toml"
    path.write_text("[tenants.alpha]\n" + entry.format(key=key) + "\n")
    # When the API is built from it
    with pytest.raises(ConfigError) as refused:
        create_app(Settings(tenants_file=path))
    # Then it refuses to start, saying what to store instead, without repeating the key
    message = str(refused.value)
    assert expected in message
    assert "sha256sum" in message
    assert key not in message


SECRET = "s3cr3t-" + "q" * 24


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ("alpha:", "SDFARM_API_KEYS entry 1 (tenant 'alpha') has no key after its ':'"),
        ("alpha:{s},:{s}x", "SDFARM_API_KEYS entry 2 has nothing before its ':'"),
        ("Alpha Team:{s}", "SDFARM_API_KEYS entry 1: the text before the first ':' is not a"),
        ("alpha:{s} {s}", "SDFARM_API_KEYS entry 1 (tenant 'alpha'): a key is visible ASCII"),
        ("alpha:{s},beta:{s}", "the same key is given twice (SDFARM_API_KEYS entry 1 and"),
    ],
    ids=["no key", "no tenant", "not a tenant name", "a space", "one key twice"],
)
def test_malformed_api_keys_stop_the_api_at_startup_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, keys: str, expected: str
) -> None:
    # Given SDFARM_API_KEYS that cannot work
    monkeypatch.setenv("SDFARM_API_KEYS", keys.format(s=SECRET))
    # When the API is built from the environment
    with pytest.raises(ConfigError) as refused:
        create_app(Settings())
    # Then it refuses at once, naming the entry and the syntax, never the key
    assert expected in str(refused.value)
    assert "TENANT:KEY or KEY" in str(refused.value) or "twice" in str(refused.value)
    assert SECRET not in str(refused.value)


def test_sdfarm_api_exits_with_the_message_and_serves_nothing() -> None:
    # Given an environment whose SDFARM_API_KEYS gives a tenant no key
    env = {**os.environ, "SDFARM_API_KEYS": f"alpha:,beta:{SECRET}"}
    # When `sdfarm api` is started
    run = subprocess.run(
        [sys.executable, "-m", "producer", "api", "--port", "1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Then it exits with a failure and one line saying what to fix, before serving anything
    assert run.returncode != 0
    assert "error: SDFARM_API_KEYS entry 1 (tenant 'alpha') has no key after its ':'" in run.stderr
    assert "Traceback" not in run.stderr
    assert "Uvicorn running" not in run.stderr
    assert SECRET not in run.stderr


# -- a real worker: an image and a manifest ------------------------------------------------------


def test_a_real_image_and_manifest_are_the_owners_alone(
    farm_env: FarmEnv, serve_api: Callable[[Settings], str]
) -> None:
    # Given a keyed farm with one worker, where alpha rendered a job
    settings = farm_env.settings.model_copy(update=KEYS)
    farm_env.start_worker()
    url = serve_api(settings)
    farm_env.wait_for_workers(1)
    with (
        FarmClient(url, ALPHA_KEY) as alpha,
        _client(url, BETA_KEY) as beta,
        _client(url, ADMIN_KEY) as admin,
    ):
        done = alpha.submit(prompts=["a lighthouse at dusk"], defaults=SMALL)
        alpha.wait(done["batch_id"], poll_s=0.2, timeout_s=180)
        job_id, batch_id = done["job_ids"][0], done["batch_id"]
        missing_job, missing_batch = job_id_for(new_batch_id(), 0), new_batch_id()
        # When beta asks for its image and its manifest, and for ones that do not exist
        image = (beta.get(f"/v1/jobs/{job_id}/image"), beta.get(f"/v1/jobs/{missing_job}/image"))
        manifest = (
            beta.get(f"/v1/batches/{batch_id}/manifest"),
            beta.get(f"/v1/batches/{missing_batch}/manifest"),
        )
        # Then beta gets the same 404 for both, exactly as for ids that never existed
        _assert_same_404(*image, (job_id, missing_job))
        _assert_same_404(*manifest, (batch_id, missing_batch))
        # And alpha (and the admin) get the stored PNG and a manifest naming its object key
        png = alpha.image(job_id)
        assert png.startswith(b"\x89PNG")
        assert admin.get(f"/v1/jobs/{job_id}/image").status_code == 307
        lines = list(alpha.manifest(batch_id))
        assert [(line["job_id"], line["state"]) for line in lines] == [(job_id, "succeeded")]
        assert lines[0]["key"].endswith(f"{batch_id}/{job_id}.png")
