"""A job's states: three of them final, so a job in one never moves again."""

from __future__ import annotations

import enum

__all__ = ["TERMINAL_STATES", "JobState"]


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
