"""Submitting work: validate every job, fix its model and seed, write it to the ledger.

Submitting is only ledger writes, pipelined; the dispatcher takes it from there.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shared.config import Settings
from shared.errors import InvalidJob
from shared.jobs import MAX_SEED, JobSpec, new_batch_id
from shared.ledger import Ledger

__all__ = ["Submitted", "submit_batch", "validate_jobs"]

log = logging.getLogger(__name__)
_MAX_REPORTED = 20  # problems listed in one refusal; more would drown the first


@dataclass(frozen=True)
class Submitted:
    batch_id: str
    job_ids: list[str]


def validate_jobs(job_dicts: Iterable[Mapping[str, Any]], settings: Settings) -> list[JobSpec]:
    """Validate each job and resolve its model and seed; refuse the whole batch on any problem."""
    default_model = settings.resolve_default_model()
    known = settings.model_names()
    specs: list[JobSpec] = []
    problems: list[dict[str, Any]] = []
    count = 0
    for index, raw in enumerate(job_dicts):
        count += 1
        if count > settings.max_jobs_per_batch:
            raise InvalidJob(
                f"a batch may hold at most {settings.max_jobs_per_batch} jobs "
                "(setting max_jobs_per_batch)",
                [{"job": index, "field": "jobs", "message": "too many jobs"}],
            )
        if len(problems) >= _MAX_REPORTED:
            continue
        if not isinstance(raw, Mapping):
            problems.append({"job": index, "field": None, "message": "a job must be a JSON object"})
            continue
        try:
            spec = JobSpec.model_validate(raw)
        except ValidationError as e:
            problems.extend(_describe(index, e))
            continue
        problem = _check_against_settings(spec, settings, known)
        if problem:
            problems.append({"job": index, **problem})
            continue
        specs.append(
            spec.model_copy(
                update={
                    "model": spec.model or default_model,
                    # Drawn here, never at render time: a redelivered job renders the same image.
                    "seed": spec.seed if spec.seed is not None else secrets.randbelow(MAX_SEED + 1),
                }
            )
        )
    if problems:
        first = problems[0]
        where = f"job {first['job']}" + (
            f", field `{first['field']}`" if first.get("field") else ""
        )
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidJob(f"{where}: {first['message']}{more}", problems)
    if not specs:
        raise InvalidJob(
            "the batch holds no jobs", [{"job": None, "field": "jobs", "message": "empty"}]
        )
    return specs


def _check_against_settings(
    spec: JobSpec, settings: Settings, known: list[str]
) -> dict[str, Any] | None:
    if len(spec.prompt) > settings.max_prompt_chars:
        return {
            "field": "prompt",
            "message": f"prompt is {len(spec.prompt)} characters; at most "
            f"{settings.max_prompt_chars} are allowed (setting max_prompt_chars)",
        }
    if len(spec.negative_prompt) > settings.max_prompt_chars:
        return {
            "field": "negative_prompt",
            "message": f"negative_prompt is {len(spec.negative_prompt)} characters; at most "
            f"{settings.max_prompt_chars} are allowed",
        }
    model = spec.model or settings.resolve_default_model()
    if model is None:
        return {
            "field": "model",
            "message": "no models are configured on this farm (SDFARM_MODELS)",
        }
    if model not in known:
        return {
            "field": "model",
            "value": model,
            "message": f"unknown model {model!r}; known: {', '.join(known)}",
        }
    return None


def _describe(index: int, error: ValidationError) -> list[dict[str, Any]]:
    out = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or None
        value = item.get("input")
        shown = value if isinstance(value, int | float | bool) or value is None else _short(value)
        message = item["msg"]
        if item["type"] == "literal_error" or item["type"] not in {"missing", "extra_forbidden"}:
            message = f"{message} (got {shown!r})"
        out.append({"job": index, "field": field, "value": shown, "message": message})
    return out


def _short(value: object) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def submit_batch(
    ledger: Ledger,
    settings: Settings,
    job_dicts: Iterable[Mapping[str, Any]],
    *,
    meta: dict[str, str] | None = None,
) -> Submitted:
    """Validate, then record every job as `queued`; nothing is written if any job is refused."""
    specs = validate_jobs(job_dicts, settings)
    batch_id = new_batch_id()
    job_ids = ledger.create_batch(batch_id, specs, meta=meta)
    log.info("batch %s: %d jobs queued", batch_id, len(job_ids))
    return Submitted(batch_id=batch_id, job_ids=job_ids)
