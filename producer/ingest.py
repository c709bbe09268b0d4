"""Accepting a submission: a JSON or NDJSON body, streamed within the configured limits, with an
optional `Idempotency-Key`.

An NDJSON body (`Content-Type: application/x-ndjson`, one job object a line) is parsed line by
line as it arrives, on the event loop (`producer.body`): a client that stalls mid-body holds no
thread while it waits, and is cut off with a 408 after `body_idle_timeout_s`. Size and count
limits are refused as soon as they are crossed: 413 past `max_body_bytes`, 422 past
`max_jobs_per_batch`, each naming the setting. Once the body is in, its jobs go to the same
validation as a JSON body (`producer.submit`, 422 past `max_prompt_chars` and the rest) in one
of ingestion's own threads (`ingest_threads`), apart from the pool the status routes use. So
nothing of a body that never ends is written, and a burst of submits never starves `/healthz`.
The caller's tenant limits (`producer.quotas`) apply to both bodies: 422 past its
`max_jobs_per_batch` or `max_priority`, 429 with `Retry-After` past its `submits_per_minute` or
`max_queued_jobs`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from anyio import to_thread
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from producer.body import Body, ndjson_batches, too_large
from producer.farm import ApiError, Farm
from producer.quotas import Quota
from producer.schemas import Submitted
from producer.submit import Accepted, submit_batch
from shared.batches import BatchCreate, check_callback_url
from shared.errors import InvalidJob
from shared.ids import job_id_for
from shared.jobs import DEFAULT_PRIORITY
from shared.ledger import DEFAULT_TENANT
from shared.problems import lone_surrogate, problems_from, summary

__all__ = ["JSON", "NDJSON", "Options", "accept"]

log = logging.getLogger(__name__)

JSON = "application/json"
NDJSON = "application/x-ndjson"
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as in the IETF draft
_PENDING_TTL_S = 600  # an idempotency key whose submission died mid-way is freed after this


@dataclass(frozen=True)
class Options:
    """What `POST /v1/batches` takes besides its body."""

    scope: str  # the caller's key (hashed): idempotency keys are kept per API key
    idempotency_key: str | None = None
    priority: int | None = None  # NDJSON only; a JSON body carries its own
    callback_url: str | None = None  # NDJSON only
    tenant: str = DEFAULT_TENANT  # the caller's tenant, recorded on the batch
    quota: Quota | None = None  # the tenant's limits; None for an admin (or an open farm)


async def accept(request: Request, farm: Farm, options: Options) -> JSONResponse:
    """The whole of `POST /v1/batches`: returns 201 with the new batch, or 200 for a replay."""
    limit = farm.settings.max_body_bytes
    media = request.headers.get("content-type", JSON).split(";")[0].strip().lower()
    if media not in (JSON, NDJSON):
        raise ApiError(415, f"send {JSON} or {NDJSON}, not {media[:60]!r}")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(limit)
    body = Body(request, farm.settings)
    idem = None
    if options.idempotency_key is not None:
        idem = _Idempotency(farm, options.scope, options.idempotency_key)
        if (earlier := idem.begin()) is not None:
            return await _replay(options.idempotency_key, earlier, body)
    try:
        if options.quota is not None:  # a look only: a limited tenant's body is not read
            options.quota.check_rate(farm.ledger, take=False)
        if media == NDJSON:
            accepted = await _submit_ndjson(farm, body, options)
        else:
            accepted = await _submit_json(farm, body, options)
    except BaseException:
        if idem is not None:
            idem.abandon()
        raise
    if idem is not None:
        idem.complete(accepted.batch_id, body.sha256.hexdigest(), len(accepted.job_ids))
    out = Submitted(batch_id=accepted.batch_id, job_ids=accepted.job_ids)
    return JSONResponse(out.model_dump(), status_code=201)


async def _submit_ndjson(farm: Farm, body: Body, options: Options) -> Accepted:
    _check_callback(farm, options.callback_url)
    priority = DEFAULT_PRIORITY if options.priority is None else options.priority
    if options.quota is not None:
        options.quota.check_priority(priority)
    meta = _meta(priority, options.callback_url)
    try:
        jobs = await _read_ndjson(farm, body, options.quota)
        return await _submit_in_thread(farm, jobs, meta, options)
    except InvalidJob as e:
        for problem in e.details:  # name the line too: job N is line N+1
            if isinstance(problem.get("job"), int):
                problem["line"] = problem["job"] + 1
        raise


async def _read_ndjson(farm: Farm, body: Body, quota: Quota | None) -> list[dict[str, Any]]:
    """Every job of the body, refused as soon as there are too many (the checks
    `producer.submit` makes again, here before the rest of the body is read)."""
    farm_max = farm.settings.max_jobs_per_batch
    tenant_max = quota.max_jobs(farm_max) if quota is not None else None
    jobs: list[dict[str, Any]] = []
    async for batch in ndjson_batches(body.chunks()):
        jobs += batch
        if len(jobs) > farm_max:
            raise InvalidJob(
                f"a batch may hold at most {farm_max} jobs (setting max_jobs_per_batch)",
                [{"job": farm_max, "field": "jobs", "message": "too many jobs"}],
            )
        if quota is not None and tenant_max is not None and len(jobs) > tenant_max:
            raise quota.too_many_jobs(tenant_max, None)
    return jobs


async def _submit_json(farm: Farm, body: Body, options: Options) -> Accepted:
    if options.priority is not None or options.callback_url is not None:
        raise InvalidJob("with a JSON body, put `priority` and `callback_url` in the body")
    create = _parse_json(await body.read())
    _check_callback(farm, create.callback_url)
    if options.quota is not None:
        options.quota.check_priority(create.priority)
    jobs = create.job_dicts(farm.models_by_hash() if create.a1111 is not None else None)
    meta = _meta(create.priority, create.callback_url)
    return await _submit_in_thread(farm, jobs, meta, options)


async def _submit_in_thread(
    farm: Farm, jobs: Iterable[Any], meta: dict[str, str], options: Options
) -> Accepted:
    """`submit_batch` off the event loop (validating and writing 100,000 jobs takes seconds), in
    ingestion's own threads: however many submits wait, the status routes' pool stays free."""
    submit = functools.partial(
        submit_batch,
        farm.ledger,
        farm.settings,
        jobs,
        meta=meta,
        native_sizes=farm.native_sizes,
        families=farm.model_families,
        loras=farm.loras,
        storage=farm.storage,  # base64 init images are stored there (producer.init_refs)
        tenant=options.tenant,
        quota=options.quota,
    )
    return await to_thread.run_sync(submit, limiter=farm.ingest_limiter)


def _parse_json(raw: bytes) -> BatchCreate:
    try:
        return BatchCreate.model_validate_json(raw)
    except ValidationError as e:
        problems = problems_from(e.errors(include_url=False))
        if e.errors()[0]["type"] == "json_invalid" and (found := _lone_surrogate(raw)):
            problems = [found]  # Pydantic's parser names no field for it: say which one
        raise InvalidJob(summary(problems), problems) from e


def _lone_surrogate(raw: bytes) -> dict[str, Any] | None:
    """The field of a body whose only fault is a lone surrogate (`"\\ud800"`), which Python's
    own parser reads and Pydantic's refuses."""
    try:
        return lone_surrogate(json.loads(raw))
    except (ValueError, RecursionError):  # not JSON for Python either: Pydantic's error stands
        return None


def _check_callback(farm: Farm, url: str | None) -> None:
    if url is None:
        return
    if not farm.settings.webhook_secret:
        raise InvalidJob(
            "this farm cannot sign callbacks: set SDFARM_WEBHOOK_SECRET on the API to use "
            "`callback_url`",
            [{"field": "callback_url", "message": "no webhook secret configured"}],
        )
    # the syntax (a JSON body's was checked with it), and an IP-literal host against the rule
    check_callback_url(url, farm.settings.webhook_allow_networks)


def _meta(priority: int, callback_url: str | None) -> dict[str, str]:
    meta = {"priority": str(priority)}
    if callback_url:
        meta["callback_url"] = callback_url
    return meta


async def _replay(key: str, earlier: dict[str, str], body: Body) -> JSONResponse:
    """A repeated Idempotency-Key: the first batch if the body is the same, else a refusal."""
    async for _ in body.chunks():  # hash it; the body's jobs are not looked at again
        pass
    if earlier.get("state") != "done":
        raise ApiError(
            409,
            f"a submission with Idempotency-Key {key!r} is still being accepted; retry shortly",
            {"Retry-After": "1"},
        )
    if earlier["sha256"] != body.sha256.hexdigest():
        raise InvalidJob(
            f"Idempotency-Key {key!r} was used for a different body (batch {earlier['batch_id']})",
            [{"field": "Idempotency-Key", "message": "reused with a different body"}],
        )
    batch_id, total = earlier["batch_id"], int(earlier["total"])
    ids = [job_id_for(batch_id, i) for i in range(total)]
    log.info("batch %s: replayed for Idempotency-Key %r", batch_id, key)
    out = Submitted(batch_id=batch_id, job_ids=ids, replayed=True)
    return JSONResponse(out.model_dump(), status_code=200)


class _Idempotency:
    """`Idempotency-Key` -> batch id, per API key, kept as long as job records (status TTL)."""

    def __init__(self, farm: Farm, scope: str, key: str) -> None:
        if not _IDEMPOTENCY_KEY.match(key):
            raise InvalidJob(
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
                [{"field": "Idempotency-Key", "message": "malformed"}],
            )
        self.records = farm.ledger.idempotency
        self.scope = scope
        self.key_hash = hashlib.sha256(key.encode()).hexdigest()
        self.ttl_s = farm.settings.status_ttl_s

    def begin(self) -> dict[str, str] | None:
        """Claim the key; returns the earlier submission's record when it is taken."""
        return self.records.begin(self.scope, self.key_hash, _PENDING_TTL_S)

    def complete(self, batch_id: str, sha256: str, total: int) -> None:
        self.records.complete(
            self.scope,
            self.key_hash,
            batch_id=batch_id,
            sha256=sha256,
            total=total,
            ttl_s=self.ttl_s,
        )

    def abandon(self) -> None:
        self.records.abandon(self.scope, self.key_hash)
