"""The job spec, its validation, job states, ids and the compatibility key.

A job spec is validated once, where it enters (API, CLI, `producer.submit`), and again by the worker
when it decodes the stored spec; both use these models, so the rules live in one place.
"""

from __future__ import annotations

import enum
import math
import re
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from shared.errors import InvalidJob

__all__ = [
    "SCHEDULERS",
    "TERMINAL_STATES",
    "BatchCreate",
    "JobSpec",
    "JobState",
    "batch_of",
    "compat_key",
    "is_batch_id",
    "is_job_id",
    "job_id_for",
    "new_batch_id",
]

# Sampler names a job may ask for; the worker maps each to a diffusers scheduler class.
SCHEDULERS: tuple[str, ...] = ("lms",)
MAX_SEED = 2**32 - 1  # A1111's range, so a seed read off an image works there too
MAX_SIDE = 2048  # pixels; a 2048x2048 SD 1.x image already needs ~20 GB without tiling
MAX_STEPS = 150


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

Prompt = Annotated[str, StringConstraints(max_length=100_000)]


class JobSpec(BaseModel):
    """One image to render. Unset `model` and `seed` are filled in at submit, never at render."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: Prompt = Field(min_length=1, description="What to draw.")
    negative_prompt: Prompt = Field(default="", description="What to steer away from.")
    model: str | None = Field(default=None, description="A configured model name.")
    scheduler: Literal["lms"] = Field(default="lms", description="Sampler name.")
    steps: int = Field(default=30, ge=1, le=MAX_STEPS, description="Denoising steps.")
    guidance: float = Field(default=7.5, ge=1.0, le=30.0, description="Classifier-free guidance.")
    width: int = Field(default=512, ge=64, le=MAX_SIDE, description="Pixels, a multiple of 8.")
    height: int = Field(default=512, ge=64, le=MAX_SIDE, description="Pixels, a multiple of 8.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Fixed at submit.")

    @field_validator("guidance", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("guidance must be a number, not a boolean")
        if isinstance(value, int):
            return float(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"guidance must be a finite number, got {value}")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 but is {value}")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain something other than whitespace")
        return value

    def params_text(self) -> str:
        """Short human form, for logs and tables."""
        return f"{self.width}x{self.height} {self.steps} steps {self.scheduler} cfg {self.guidance}"


class BatchCreate(BaseModel):
    """A submission: either full `jobs`, or `prompts` that share `defaults`."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[dict[str, Any]] | None = None
    prompts: list[str] | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)

    def job_dicts(self) -> list[dict[str, Any]]:
        if (self.jobs is None) == (self.prompts is None):
            raise InvalidJob("give exactly one of `jobs` (a list of job objects) or `prompts`")
        if "prompt" in self.defaults:
            raise InvalidJob("`defaults` may not hold a prompt; put prompts in `prompts`")
        if self.jobs is not None:
            return [{**self.defaults, **job} for job in self.jobs]
        assert self.prompts is not None
        return [{**self.defaults, "prompt": prompt} for prompt in self.prompts]


def compat_key(spec: JobSpec) -> str:
    """Jobs with the same key can share one batched pass on the GPU."""
    return f"{spec.model}|{spec.width}x{spec.height}|{spec.steps}|{spec.scheduler}"


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
