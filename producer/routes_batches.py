"""The /v1/batches routes: submit, list, watch, page through jobs, manifest, cancel, retry.

Each answers only the caller's own batches (an admin's: every tenant's); another tenant's batch
id is the same 404 as a missing one (`producer.ownership`).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from producer import ingest
from producer.capacity import unserved_note
from producer.farm import GUARDED, ApiError, CallerDep, FarmDep
from producer.manifest import manifest_lines
from producer.ownership import check_batch
from producer.quotas import quota_of
from producer.schemas import (
    BatchCancelled,
    BatchList,
    BatchPublic,
    JobsPage,
    ManifestLine,
    Retried,
    Submitted,
    batch_public,
    errors,
    job_public,
)
from shared.batches import MAX_CALLBACK_URL_CHARS, BatchCreate
from shared.ids import is_batch_id
from shared.jobs import MAX_PRIORITY, JobSpec, JobState
from shared.ledger import BatchRecord

__all__ = ["router"]

log = logging.getLogger(__name__)

PAGE_SCAN_LIMIT = 20_000  # ids looked at per filtered page; the cursor resumes past them
_SCAN_WINDOW = 1000  # ids whose states are read per round trip while filtering

router = APIRouter(dependencies=GUARDED, tags=["batches"], responses=errors(400, 401, 503))

_SUBMIT_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        ingest.JSON: {"schema": {"$ref": "#/components/schemas/BatchCreate"}},
        ingest.NDJSON: {
            "schema": {
                "type": "string",
                "description": "One job object (as in `jobs`) a line; batch options as query "
                "parameters.",
            }
        },
    },
}


@router.post(
    "/v1/batches",
    status_code=201,
    response_model=Submitted,
    summary="Submit a batch (JSON, or NDJSON streamed up to max_jobs_per_batch jobs)",
    responses={
        200: {"model": Submitted, "description": "A replay: the Idempotency-Key's first batch."},
        **errors(409, 413, 415, 422, 429, 507),
    },
    openapi_extra={"requestBody": _SUBMIT_BODY},
)
async def create_batch(
    *,
    request: Request,
    f: FarmDep,
    caller: CallerDep,
    idempotency_key: Annotated[
        str | None,
        Header(description="Repeat it to get the first batch back instead of a second one."),
    ] = None,
    priority: Annotated[
        int | None,
        Query(ge=0, le=MAX_PRIORITY, description="NDJSON only: 0-9, 9 most urgent (default 5)."),
    ] = None,
    callback_url: Annotated[
        str | None,
        Query(
            max_length=MAX_CALLBACK_URL_CHARS,
            description="NDJSON only: POSTed when the batch ends.",
        ),
    ] = None,
) -> JSONResponse:
    options = ingest.Options(
        caller.scope, idempotency_key, priority, callback_url, caller.name, quota_of(caller)
    )
    return await ingest.accept(request, f, options)


@router.get("/v1/batches", response_model=BatchList, responses=errors(422))
def list_batches(
    f: FarmDep,
    caller: CallerDep,
    cursor: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> BatchList:
    """The caller's batches (an admin's: every tenant's), newest first."""
    tenant = caller.listing()  # a tenant pages through its own index, never a filtered page
    records = f.ledger.batches_page(cursor, limit, tenant=tenant)  # expired ones are dropped
    batches = [_with_estimate(f, record) for record in records]
    more = cursor + limit < f.ledger.stats.batch_count(tenant)
    return BatchList(batches=batches, next_cursor=cursor + limit if more else None)


@router.get("/v1/batches/{batch_id}", response_model=BatchPublic, responses=errors(404))
def get_batch(batch_id: str, f: FarmDep, caller: CallerDep) -> BatchPublic:
    """Counters (O(1) whatever the batch size), queue position and ETA."""
    _check_batch_id(batch_id)
    check_batch(f.ledger, caller, batch_id)
    return _with_estimate(f, f.ledger.batch(batch_id))


@router.get("/v1/batches/{batch_id}/jobs", response_model=JobsPage, responses=errors(404, 422))
def list_jobs(
    *,
    batch_id: str,
    f: FarmDep,
    caller: CallerDep,
    cursor: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    state: JobState | None = None,
    presign: Annotated[
        bool, Query(description="Add presigned `image_url` and `thumbnail_url` (S3).")
    ] = False,
) -> JobsPage:
    """Jobs in submit order. With `state`, a page holds only jobs in that state; it may hold
    fewer than `limit` when many jobs were skipped, and `next_cursor` resumes after them."""
    _check_batch_id(batch_id)
    check_batch(f.ledger, caller, batch_id)
    total = f.ledger.batch(batch_id)["total"]  # 404 for an unknown batch
    position = cursor
    ids: list[str] = []
    if state is None:
        ids = f.ledger.batch_job_ids(batch_id, cursor, cursor + limit - 1)
        position = cursor + len(ids)
    else:
        while position < total and len(ids) < limit and position - cursor < PAGE_SCAN_LIMIT:
            window = f.ledger.batch_job_ids(batch_id, position, position + _SCAN_WINDOW - 1)
            if not window:
                break
            for job_id, job_state in zip(window, f.ledger.job_states(window), strict=True):
                position += 1
                if job_state == state.value:
                    ids.append(job_id)
                    if len(ids) == limit:
                        break
    jobs = []
    for record in f.ledger.jobs(ids):
        if record is None:
            continue
        url = thumb = None
        if presign and record.state is JobState.SUCCEEDED and record.image_key:
            url = f.storage.url(record.image_key, f.settings.presign_expiry_s)
            thumb_key = (record.result or {}).get("thumbnail_key")
            thumb = f.storage.url(thumb_key, f.settings.presign_expiry_s) if thumb_key else None
        if state is None or record.state is state:
            jobs.append(job_public(record, url, thumb))
    return JobsPage(jobs=jobs, next_cursor=position if position < total else None)


@router.get(
    "/v1/batches/{batch_id}/manifest",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "NDJSON, one `ManifestLine` a line, in submit order.",
            "content": {ingest.NDJSON: {"schema": ManifestLine.model_json_schema()}},
        },
        **errors(404),
    },
)
def get_manifest(batch_id: str, f: FarmDep, caller: CallerDep) -> StreamingResponse:
    """Every job: id, prompt, params, seed, model hash, object key, state and error."""
    _check_batch_id(batch_id)
    check_batch(f.ledger, caller, batch_id)
    f.ledger.batch(batch_id)
    return StreamingResponse(manifest_lines(f.ledger, batch_id), media_type=ingest.NDJSON)


@router.delete("/v1/batches/{batch_id}", response_model=BatchCancelled, responses=errors(404))
def cancel_batch(batch_id: str, f: FarmDep, caller: CallerDep) -> BatchCancelled:
    """Cancel the whole batch: queued jobs never render, running ones stop at the next step."""
    _check_batch_id(batch_id)
    check_batch(f.ledger, caller, batch_id)
    done = f.ledger.cancel_batch(batch_id)
    log.info("batch %s: cancel requested (%s)", batch_id, done)
    counts = f.ledger.batch(batch_id).counts
    return BatchCancelled(batch_id=batch_id, counts=counts, **done)


@router.post("/v1/batches/{batch_id}/retry", response_model=Retried, responses=errors(404))
def retry_batch(batch_id: str, f: FarmDep, caller: CallerDep) -> Retried:
    """Queue the failed and cancelled jobs again, with their original seeds."""
    _check_batch_id(batch_id)
    check_batch(f.ledger, caller, batch_id)
    requeued = f.ledger.retry_batch(batch_id)  # also makes the batch active again
    log.info("batch %s: %d jobs queued again", batch_id, requeued)
    return Retried(batch_id=batch_id, requeued=requeued, counts=f.ledger.batch(batch_id).counts)


def _with_estimate(f: FarmDep, record: BatchRecord) -> BatchPublic:
    estimate = f.queue.estimate(record)
    models = sorted(record.models)
    return batch_public(
        record,
        queue_position=estimate.queue_position,
        eta_s=estimate.eta_s,
        throughput=estimate.throughput,
        waiting_for=unserved_note(f.queue.serving_models, models, record.counts),
    )


def _check_batch_id(batch_id: str) -> None:
    if not is_batch_id(batch_id):
        raise ApiError(
            404, f"no batch {batch_id[:40]!r}: batch ids look like b followed by 20 hex digits"
        )


def submit_schemas() -> dict[str, Any]:
    """The submit route reads its body itself (to stream NDJSON), so FastAPI cannot see its
    shape; these put it in /openapi.json: a `BatchCreate` whose `jobs` are `JobSpec`s."""
    template = "#/components/schemas/{model}"
    batch = BatchCreate.model_json_schema(ref_template=template)
    batch["properties"]["jobs"]["anyOf"][0]["items"] = {"$ref": template.format(model="JobSpec")}
    batch["anyOf"] = [{"required": ["jobs"]}, {"required": ["prompts"]}]
    job = JobSpec.model_json_schema(ref_template=template)
    for side in ("width", "height"):
        job["properties"][side]["multipleOf"] = 8
    return {"BatchCreate": batch, "JobSpec": job, **job.pop("$defs", {})}
