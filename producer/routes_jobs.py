"""The /v1/jobs and /v1/workers routes: one job, its image and thumbnail, cancelling it; the
live workers.

A job of another tenant's batch is the same 404 as a missing job (`producer.ownership`); a
tenant sees every live worker, but among their current jobs only its own.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from producer.capacity import unserved_note
from producer.farm import GUARDED, ApiError, CallerDep, FarmDep
from producer.ownership import check_job, visible_job_ids
from producer.schemas import JobCancelled, JobPublic, WorkersList, errors, job_public
from shared.ids import is_job_id
from shared.image_formats import format_of_key
from shared.jobs import JobState

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(dependencies=GUARDED, responses=errors(400, 401, 503))


@router.get("/v1/jobs/{job_id}", response_model=JobPublic, responses=errors(404), tags=["jobs"])
def get_job(job_id: str, f: FarmDep, caller: CallerDep) -> JobPublic:
    """One job: state, progress (step k of n), spec, result, error."""
    _check_job_id(job_id)
    check_job(f.ledger, caller, job_id)
    record = f.ledger.job(job_id)
    waiting = unserved_note(f.queue.serving_models, [record.model], {record.state.value: 1})
    return job_public(record).model_copy(update={"waiting_for": waiting})


@router.get(
    "/v1/jobs/{job_id}/image",
    response_class=Response,
    tags=["jobs"],
    responses={
        200: {
            "content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}},
            "description": "The image in its job's format (file:// storage).",
        },
        307: {"description": "A presigned URL of the image (S3 storage), in `Location`."},
        **errors(404, 409),
    },
)
def get_image(job_id: str, f: FarmDep, caller: CallerDep) -> Response:
    """The job's image (PNG, WebP or JPEG, as it asked): a redirect to a short-lived presigned
    URL, or the bytes themselves."""
    _check_job_id(job_id)
    check_job(f.ledger, caller, job_id)
    record = f.ledger.job(job_id)
    key = record.image_key
    if record.state is not JobState.SUCCEEDED or key is None:
        raise ApiError(
            409, f"job {job_id} is {record.state}; its image exists once it has succeeded"
        )
    url = f.storage.url(key, f.settings.presign_expiry_s)
    if url is None:
        return Response(f.storage.get(key), media_type=format_of_key(key).mime)
    return RedirectResponse(url, status_code=307)


@router.get(
    "/v1/jobs/{job_id}/thumbnail",
    response_class=Response,
    tags=["jobs"],
    responses={
        200: {"content": {"image/webp": {}}, "description": "The WebP thumbnail (file://)."},
        307: {"description": "A presigned URL of the thumbnail (S3 storage), in `Location`."},
        **errors(404),
    },
)
def get_thumbnail(job_id: str, f: FarmDep, caller: CallerDep) -> Response:
    """The job's WebP thumbnail (`thumbnail_px` on its longest side), as `image` serves the
    image; 404 while it has none (not succeeded yet, or rendered with thumbnails off)."""
    _check_job_id(job_id)
    check_job(f.ledger, caller, job_id)
    record = f.ledger.job(job_id)
    key = (record.result or {}).get("thumbnail_key")
    if record.state is not JobState.SUCCEEDED or not key:
        done = record.state is JobState.SUCCEEDED
        why = "rendered with thumbnail_px 0" if done else f"it is {record.state}"
        raise ApiError(404, f"job {job_id} has no thumbnail ({why})")
    url = f.storage.url(key, f.settings.presign_expiry_s)
    if url is None:
        return Response(f.storage.get(key), media_type="image/webp")
    return RedirectResponse(url, status_code=307)


@router.delete(
    "/v1/jobs/{job_id}", response_model=JobCancelled, responses=errors(404), tags=["jobs"]
)
def cancel_job(job_id: str, f: FarmDep, caller: CallerDep) -> JobCancelled:
    """Cancel: a queued job never renders, a running one stops at its next sampling step."""
    _check_job_id(job_id)
    check_job(f.ledger, caller, job_id)
    previous = f.ledger.request_cancel(job_id)
    log.info("job %s: cancel requested (was %s)", job_id, previous)
    return JobCancelled(job_id=job_id, state=f.ledger.job(job_id)["state"], was=previous)


@router.get("/v1/workers", response_model=WorkersList, tags=["workers"])
def workers(f: FarmDep, caller: CallerDep) -> WorkersList:
    """Live workers from their heartbeats, with images per second over the last minute.

    `current` lists only the caller's own jobs (an admin's: every job a worker renders).
    """
    records = f.ledger.workers.live()
    current = [str(j) for record in records for j in record.get("current") or []]
    visible = visible_job_ids(f.ledger, caller, current)
    for record in records:
        record["current"] = [j for j in record.get("current") or [] if j in visible]
        record["images_per_s"] = f.queue.worker_rate(record["worker_id"])
    return WorkersList.model_validate({"workers": records})


def _check_job_id(job_id: str) -> None:
    if not is_job_id(job_id):
        raise ApiError(404, f"no job {job_id[:40]!r}: job ids look like <batch id>-<number>")
