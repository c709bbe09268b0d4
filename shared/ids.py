"""Batch and job ids: a job id embeds its batch's, so a transition finds the batch's counters
without a lookup, and a route can tell a malformed id from a missing one before reading."""

from __future__ import annotations

import re
import secrets

from shared.errors import InvalidJob

__all__ = ["batch_of", "is_batch_id", "is_job_id", "job_id_for", "new_batch_id"]

_BATCH_RE = re.compile(r"^b[0-9a-f]{20}$")
_JOB_RE = re.compile(r"^(b[0-9a-f]{20})-([0-9]{1,7})$")


def new_batch_id() -> str:
    return "b" + secrets.token_hex(10)


def job_id_for(batch_id: str, index: int) -> str:
    """Job ids embed their batch, so a transition finds the batch counters without a lookup."""
    return f"{batch_id}-{index}"


def is_batch_id(value: str) -> bool:
    return bool(_BATCH_RE.match(value))


def is_job_id(value: str) -> bool:
    return bool(_JOB_RE.match(value))


def batch_of(job_id: str) -> str:
    match = _JOB_RE.match(job_id)
    if not match:
        raise InvalidJob(f"{job_id!r} is not a job id (expected b<20 hex>-<n>)")
    return match.group(1)
