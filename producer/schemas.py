"""What the API returns, as pydantic models (they also make /openapi.json truthful)."""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, Field

from producer.parameters import job_infotext
from shared.ledger import BatchRecord, JobRecord

__all__ = [
    "BatchCancelled",
    "BatchList",
    "BatchPublic",
    "ErrorBody",
    "Health",
    "JobCancelled",
    "JobPublic",
    "JobsPage",
    "LoopHealth",
    "ManifestLine",
    "Retried",
    "Submitted",
    "WorkerPublic",
    "WorkersList",
    "batch_public",
    "errors",
    "job_public",
]


class ErrorBody(BaseModel):
    """Every error: a one-line reason, and for refused input the problems one by one."""

    error: str
    problems: list[dict[str, Any]] | None = None


class Submitted(BaseModel):
    batch_id: str
    job_ids: list[str]
    replayed: bool = Field(
        default=False, description="True when an Idempotency-Key matched an earlier submission."
    )


class BatchPublic(BaseModel):
    batch_id: str
    tenant: str | None = Field(default=None, description="The tenant that submitted it.")
    total: int
    counts: dict[str, int]
    created_at: float
    finished_at: float | None = None
    cancelled_at: float | None = None
    priority: int | None = Field(default=None, description="0-9; 9 is the most urgent.")
    models: list[str] = Field(default_factory=list)
    queue_position: int | None = Field(
        default=None,
        description="Queued jobs of other batches that go first (more urgent, or as urgent and "
        "older, sharing a model); an upper bound. 0 once all its jobs run; None once it ended.",
    )
    eta_s: float | None = Field(
        default=None,
        description="Seconds until the batch ends at the recently measured throughput; None "
        "while nothing has been measured yet.",
    )
    throughput: float | None = Field(
        default=None, description="Images per second the farm recently made for these models."
    )
    manifest: str | None = Field(default=None, description="Where the manifest was stored.")
    webhook: dict[str, Any] | None = Field(
        default=None, description="Callback delivery: state, attempts, last error."
    )
    waiting_for: str | None = Field(
        default=None,
        description="Why queued jobs do not move, e.g. no live worker holds the model.",
    )


class BatchList(BaseModel):
    batches: list[BatchPublic]
    next_cursor: int | None = None


class JobPublic(BaseModel):
    job_id: str
    batch_id: str
    state: str
    progress: dict[str, int]
    spec: dict[str, Any]
    attempts: int = 0
    worker: str | None = None
    result: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    model_hash: str | None = None
    model_family: str | None = Field(
        default=None, description="The family of the model that rendered it: sd1, sd2, sdxl."
    )
    refiner_hash: str | None = Field(
        default=None, description="The short hash of the SDXL refiner that finished it, if any."
    )
    error: str | None = None
    last_error: str | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="What the render changed or lost, e.g. prompt words past CLIP's 75 tokens.",
    )
    image_url: str | None = Field(
        default=None, description="A presigned URL of the image (`presign=true`, S3 storage)."
    )
    thumbnail_url: str | None = Field(
        default=None, description="A presigned URL of its WebP thumbnail (`presign=true`, S3)."
    )
    infotext: str | None = Field(
        default=None, description="Once succeeded: its A1111 `parameters` text, to copy."
    )
    waiting_for: str | None = Field(
        default=None,
        description="Why a queued job does not move, e.g. no live worker holds its model.",
    )


class JobsPage(BaseModel):
    jobs: list[JobPublic]
    next_cursor: int | None = Field(
        default=None, description="Pass as `cursor` for the next page; None at the end."
    )


class JobCancelled(BaseModel):
    job_id: str
    state: str
    was: str = Field(description="The state the cancel found the job in.")


class BatchCancelled(BaseModel):
    batch_id: str
    cancelled: int = Field(description="Queued jobs cancelled now; they never render.")
    stopping: int = Field(description="Running jobs asked to stop at their next sampling step.")
    counts: dict[str, int]


class Retried(BaseModel):
    batch_id: str
    requeued: int = Field(description="Failed and cancelled jobs queued again, same seeds.")
    counts: dict[str, int]


class WorkerPublic(BaseModel):
    worker_id: str
    host: str | None = None
    pid: int | None = None
    device: str | None = None
    models: list[str] = Field(default_factory=list)
    model_hashes: dict[str, str] = Field(default_factory=dict)
    model_families: dict[str, str] = Field(
        default_factory=dict,
        description="Each model's family, read from it: sd1, sd2, sdxl, sdxl-refiner.",
    )
    vaes: list[str] = Field(default_factory=list, description="The VAEs of SDFARM_VAES it holds.")
    current: list[str] = Field(default_factory=list)
    images_done: int = 0
    images_per_s: float = Field(default=0.0, description="Over the last minute.")
    last_seen: float | None = None


class WorkersList(BaseModel):
    workers: list[WorkerPublic]


class LoopHealth(BaseModel):
    """One background loop of this API process (`producer.loop_health`)."""

    alive: bool = Field(description="It completed an iteration within `loop_stall_s`.")
    last_iteration_s_ago: float
    restarts: int = Field(description="Times it failed and was started again.")
    last_error: str | None = None


class Health(BaseModel):
    ok: bool
    dispatcher_active: bool
    loops: dict[str, LoopHealth] = Field(
        default_factory=dict, description="dispatcher, finisher, webhooks: each one's liveness."
    )


class ManifestLine(BaseModel):
    """One line of a batch manifest (NDJSON): what was asked, and what became of it."""

    job_id: str
    state: str
    prompt: str
    negative_prompt: str
    params: dict[str, Any] = Field(description="model, scheduler, steps, guidance, size.")
    seed: int
    model_hash: str | None = None
    key: str | None = Field(default=None, description="The image's object key.")
    uri: str | None = None
    bytes: int | None = None
    format: str = Field(default="png", description="png, webp or jpeg: the key's extension.")
    content_type: str = Field(default="image/png", description="The image's Content-Type.")
    thumbnail_key: str | None = Field(default=None, description="Its WebP thumbnail's key.")
    error: str | None = None


def _public_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as stored, except an inline init image, which is shown by size and digest.

    An uploaded init image can be megabytes of base64; echoing it in every status poll and page
    of jobs would cost more than the rest of the response.
    """
    image = spec.get("init_image")
    if not image or image.startswith(("s3://", "upload:")):  # a reference is shown as it is
        return spec
    digest = hashlib.sha256(image.encode()).hexdigest()[:16]
    return {
        **spec,
        "init_image": f"<inline image: {len(image)} base64 characters, sha256 {digest}>",
    }


def job_public(
    record: JobRecord, image_url: str | None = None, thumbnail_url: str | None = None
) -> JobPublic:
    """The public view of a job record from `Ledger.job`."""
    return JobPublic(
        job_id=record.job_id,
        batch_id=record.batch_id,
        state=record.state,
        progress={"step": record.step, "steps": record.steps},
        spec=_public_spec(record["spec"]),
        attempts=record.attempts,
        worker=record.worker,
        result=record.result,
        timings=record.timings,
        model_hash=record.model_hash,
        model_family=record.get("model_family") or None,
        refiner_hash=record.get("refiner_hash") or None,
        error=record.error,
        last_error=record.last_error,
        warnings=record.warnings,
        image_url=image_url,
        thumbnail_url=thumbnail_url,
        infotext=job_infotext(record),
    )


def batch_public(record: BatchRecord, **estimates: Any) -> BatchPublic:
    """The public view of a batch record from `Ledger.batch`, with ETA fields when given."""
    return BatchPublic(
        batch_id=record.batch_id,
        tenant=record.tenant,
        total=record.total,
        counts=record.counts,
        created_at=record.created_at,
        finished_at=record.finished_at,
        cancelled_at=record.cancelled_at,
        priority=int(record["priority"]) if record.get("priority") else None,
        models=sorted(record.models),
        manifest=record.manifest,
        webhook=record.webhook,
        **estimates,
    )


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, all with the `ErrorBody` shape."""
    return {code: {"model": ErrorBody, "description": _ERROR_TEXT[code]} for code in codes}


_ERROR_TEXT = {
    400: "An API key in the query string, or a request the farm refuses.",
    401: "Missing or wrong API key (`Authorization: Bearer KEY`).",
    404: "No such batch or job (never existed, its record expired, or another tenant's).",
    409: "The job is not in a state where this is possible.",
    413: "The request body is over `max_body_bytes`, or the batch alone is over the job "
    "ledger's budget (`ledger_max_bytes`, or Redis's maxmemory less `ledger_headroom`).",
    415: "A body that is neither JSON nor NDJSON.",
    422: "Invalid input; `problems` lists each field, value and allowed range.",
    429: "Over the tenant's `submits_per_minute` or `max_queued_jobs`; `Retry-After` says when "
    "to try again.",
    503: "The job ledger (Redis) or the object store is unavailable; try again.",
    507: "The job ledger's budget has no room for the batch now; nothing of it was written.",
}
