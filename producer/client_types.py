"""What the farm's API answers, as the clients return it (`FarmClient`, `AsyncFarmClient`).

These are `TypedDict`s: plain dicts at run time (`json.dumps` prints them as the API sent them, and
`status["counts"]` keeps working), checked by mypy. Their fields are those of the API's pydantic
models (`producer.schemas`), which `/openapi.json` documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

__all__ = [
    "BatchCancelled",
    "BatchStatus",
    "Health",
    "JobCancelled",
    "JobStatus",
    "Retried",
    "SubmitOptions",
    "Submitted",
    "WorkerInfo",
]


class Submitted(TypedDict):
    batch_id: str
    job_ids: list[str]
    replayed: bool


class BatchStatus(TypedDict):
    batch_id: str
    tenant: str | None
    total: int
    counts: dict[str, int]
    created_at: float
    finished_at: float | None
    cancelled_at: float | None
    priority: int | None
    models: list[str]
    queue_position: int | None
    eta_s: float | None
    throughput: float | None
    manifest: str | None
    webhook: dict[str, Any] | None
    waiting_for: str | None


class JobStatus(TypedDict):
    job_id: str
    batch_id: str
    state: str
    progress: dict[str, int]
    spec: dict[str, Any]
    attempts: int
    worker: str | None
    result: dict[str, Any] | None
    timings: dict[str, Any] | None
    model_hash: str | None
    model_family: str | None
    refiner_hash: str | None
    error: str | None
    last_error: str | None
    warnings: list[str]
    image_url: str | None
    waiting_for: str | None


class JobCancelled(TypedDict):
    job_id: str
    state: str
    was: str


class BatchCancelled(TypedDict):
    batch_id: str
    cancelled: int
    stopping: int
    counts: dict[str, int]


class Retried(TypedDict):
    batch_id: str
    requeued: int
    counts: dict[str, int]


class WorkerInfo(TypedDict):
    worker_id: str
    host: str | None
    pid: int | None
    device: str | None
    models: list[str]
    model_hashes: dict[str, str]
    model_families: dict[str, str]
    vaes: list[str]
    current: list[str]
    images_done: int
    images_per_s: float
    last_seen: float | None


class Health(TypedDict):
    ok: bool
    dispatcher_active: bool
    loops: dict[str, dict[str, Any]]  # dispatcher, finisher, webhooks: each one's liveness


class SubmitOptions(TypedDict, total=False):
    """The keyword arguments of `submit` (and, but for the job lists, of `submit_stream`)."""

    prompts: Sequence[str] | None
    a1111: Sequence[str] | None
    defaults: dict[str, Any] | None
    priority: int | None
    callback_url: str | None
    idempotency_key: str | None
