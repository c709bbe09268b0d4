"""One error tree for the whole farm.

    SdfarmError
    ├── InvalidJob            (permanent)  a job spec or request that breaks a rule
    │   └── BatchTooLarge                  a batch bigger than the job ledger's whole budget
    ├── UnknownId             (permanent)  a batch or job id the ledger does not hold
    ├── AccessDenied          (permanent)  the API refused the client's key (missing or wrong)
    ├── ConfigError           (permanent)  settings that cannot work (keys, the tenants file)
    ├── IllegalTransition     (permanent)  a state change the ledger refuses
    ├── ModelLoadError        (permanent)  a model that cannot be loaded at worker start
    ├── WorkerSetupError      (permanent)  worker options this machine cannot honour (--gpus)
    ├── ServiceStartError     (permanent)  a local service (Redis, SeaweedFS...) did not come up
    ├── RenderCancelled       (permanent)  the job was cancelled while it rendered
    ├── RenderFailed          (permanent)  the sampling loop failed for this job
    ├── RateLimited           (retryable)  a tenant over its submit rate or queued jobs; retry after
    ├── LedgerFull            (retryable)  the ledger's budget has no room for the batch now
    ├── StorageError          (retryable)  the object store failed or timed out
    │   └── StorageRefused                 it answered and refused: credentials, permissions, bucket
    ├── WorkerStopping        (retryable)  the worker is shutting down; its work is handed back
    └── FarmUnreachable       (retryable)  the API or Redis cannot be reached

Each class says whether retrying the same work may succeed (`retryable`), so that the worker and
the client decide retries from the error's type, not from its message; and which `FailureReason`
a job that it ends gets, which the ledger records at the transition and /metrics counts.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "AccessDenied",
    "BatchTooLarge",
    "ConfigError",
    "FailureReason",
    "FarmUnreachable",
    "IllegalTransition",
    "InvalidJob",
    "LedgerFull",
    "ModelLoadError",
    "RateLimited",
    "RenderCancelled",
    "RenderFailed",
    "SdfarmError",
    "ServiceStartError",
    "StorageError",
    "StorageRefused",
    "UnknownId",
    "WorkerSetupError",
    "WorkerStopping",
]


class FailureReason(enum.StrEnum):
    """Why a job ended `failed` or `cancelled`: a bounded label, recorded at the transition."""

    WORKER_LOST = "worker_lost"  # its lease lapsed: the worker died, froze or lost Redis
    STORAGE = "storage"  # its image (or init image) could not be stored or read
    RENDER_FAILED = "render_failed"  # the sampling loop failed for it
    OUT_OF_MEMORY = "out_of_memory"  # even a pass of one row did not fit
    INVALID_INPUT = "invalid_input"  # its spec or init image cannot be used
    CANCELLED = "cancelled"  # someone asked
    OTHER = "other"


class SdfarmError(Exception):
    """Base of every error sdfarm raises on purpose."""

    retryable: bool = False
    reason: FailureReason = FailureReason.OTHER


class InvalidJob(SdfarmError):
    """A job spec or request that breaks a rule; the message names the field and what is allowed."""

    reason = FailureReason.INVALID_INPUT

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


class BatchTooLarge(InvalidJob):
    """A batch that alone would take the job ledger past its budget (HTTP 413); the message
    names the size, the budget and how many such jobs fit."""


class UnknownId(SdfarmError):
    """A batch or job id that the ledger does not hold (never existed, or its record expired)."""


class AccessDenied(SdfarmError):
    """The API refused the client's key: none was sent, or it is not one of SDFARM_API_KEYS."""


class ConfigError(SdfarmError):
    """Settings that cannot work, found at startup: a malformed SDFARM_API_KEYS entry, a tenants
    file holding a key in clear text. The message names the setting and what to write instead."""


class IllegalTransition(SdfarmError):
    """A job state change that the ledger refuses (for example leaving a terminal state)."""


class ModelLoadError(SdfarmError):
    """A model that cannot be loaded; raised at worker start, never at the first job."""


class WorkerSetupError(SdfarmError):
    """Worker options this machine cannot honour, such as `--gpus` where there is no GPU."""


class RenderCancelled(SdfarmError):
    """The job was cancelled while it rendered; raised from the per-step callback."""

    reason = FailureReason.CANCELLED


class RenderFailed(SdfarmError):
    """The sampling loop failed for a job in a way that retrying will not fix."""

    reason = FailureReason.RENDER_FAILED


class RateLimited(SdfarmError):
    """A tenant over its submit rate or its `max_queued_jobs`; `retry_after_s` says when to try
    again (HTTP 429)."""

    retryable = True

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LedgerFull(SdfarmError):
    """The job ledger's budget (or Redis's memory) has no room for the batch now (HTTP 507);
    nothing of it was written. Room comes back as older records expire."""

    retryable = True


class StorageError(SdfarmError):
    """The object store failed or timed out; the work is handed back and retried later."""

    retryable = True
    reason = FailureReason.STORAGE


class StorageRefused(StorageError):
    """The object store answered and refused (wrong credentials, no permission, no such bucket):
    waiting will not fix it, changing the configuration will."""

    retryable = False


class WorkerStopping(SdfarmError):
    """The worker is shutting down; the jobs it still renders are handed back to the ledger."""

    retryable = True


class FarmUnreachable(SdfarmError):
    """The API or Redis cannot be reached."""

    retryable = True


class ServiceStartError(SdfarmError):
    """A local service (Redis, SeaweedFS, the API, a worker) is missing or did not come up."""
