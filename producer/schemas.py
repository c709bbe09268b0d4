"""What the API returns, as pydantic models (they also make /openapi.json truthful)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["BatchPublic", "JobPublic", "JobsPage", "Submitted"]


class Submitted(BaseModel):
    batch_id: str
    job_ids: list[str]


class BatchPublic(BaseModel):
    batch_id: str
    total: int
    counts: dict[str, int]
    created_at: float
    finished_at: float | None = None


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
    error: str | None = None
    last_error: str | None = None


class JobsPage(BaseModel):
    jobs: list[JobPublic]
    next_cursor: int | None = None
