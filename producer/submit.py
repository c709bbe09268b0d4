"""Submitting work: validate every job, fix its model and seed, write it to the ledger.

Submitting is only ledger writes, pipelined; the dispatcher takes it from there.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from producer.init_refs import prepare_init_images
from producer.lora_checks import check_loras
from producer.quotas import Quota
from shared.config import Settings
from shared.errors import InvalidJob
from shared.ids import new_batch_id
from shared.jobs import MAX_SEED, JobSpec
from shared.ledger import DEFAULT_TENANT, Ledger
from shared.lora_library import LoraLibrary
from shared.problems import problems_from
from shared.storage import Storage

__all__ = ["Accepted", "submit_batch", "validate_jobs"]

log = logging.getLogger(__name__)
_MAX_REPORTED = 20  # problems listed in one refusal; more would drown the first


@dataclass(frozen=True)
class Accepted:
    """A batch written to the ledger: its id and its jobs' ids, in submission order."""

    batch_id: str
    job_ids: list[str]


def validate_jobs(
    job_dicts: Iterable[Mapping[str, Any]],
    settings: Settings,
    native_sizes: Mapping[str, int] | None = None,
    families: Mapping[str, str] | None = None,
    *,
    quota: Quota | None = None,
    loras: LoraLibrary | None = None,
) -> list[JobSpec]:
    """Validate each job and resolve its model, seed and size; refuse the whole batch on any
    problem. A job that names no width or height gets its model's native size where
    `native_sizes` knows it (`shared.families`), else the spec's default. Where `families`
    knows a model's family, a refiner must be an sdxl-refiner finishing an sdxl base. A
    tenant's `quota` may hold fewer jobs a batch than the farm's setting. The LoRAs a job names
    are in the library `loras` and made for its model's family (`producer.lora_checks`)."""
    sizes = native_sizes or {}
    tenant_max_jobs = quota.max_jobs(settings.max_jobs_per_batch) if quota else None
    size = len(job_dicts) if isinstance(job_dicts, Sized) else None  # None: a stream
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
        if quota is not None and tenant_max_jobs is not None and count > tenant_max_jobs:
            raise quota.too_many_jobs(index, size)
        if len(problems) >= _MAX_REPORTED:
            continue
        if not isinstance(raw, Mapping):
            problems.append({"job": index, "field": None, "message": "a job must be a JSON object"})
            continue
        filled = dict(raw)  # filled in before validating: a copy of the model would cost more
        if not filled.get("model") and default_model is not None:
            filled["model"] = default_model
        native = sizes.get(filled.get("model") or "")
        if native is not None:
            filled.setdefault("width", native)
            filled.setdefault("height", native)
        if filled.get("seed") is None:
            # Drawn here, never at render time: a redelivered job renders the same image.
            filled["seed"] = secrets.randbelow(MAX_SEED + 1)
        try:
            spec = JobSpec.model_validate(filled)
        except ValidationError as e:
            problems.extend({"job": index, **p} for p in problems_from(e.errors(include_url=False)))
            continue
        problem = (
            _check_against_settings(spec, settings, known)
            or _check_refiner(spec, known, families or {})
            or check_loras(spec, loras, families or {})
        )
        if problem:
            problems.append({"job": index, **problem})
            continue
        specs.append(spec)
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
    if spec.vae is not None and spec.vae not in settings.vaes:
        return {
            "field": "vae",
            "value": spec.vae,
            "message": f"unknown VAE {spec.vae!r}; known: {', '.join(settings.vaes) or 'none'} "
            "(setting SDFARM_VAES)",
        }
    return None


def _check_refiner(
    spec: JobSpec, known: list[str], families: Mapping[str, str]
) -> dict[str, Any] | None:
    """The refiner is a configured model, and the families fit where they are known here (the
    worker checks again for models whose folders only the workers can read)."""
    if spec.refiner is None:
        if families.get(str(spec.model)) == "sdxl-refiner":
            return {
                "field": "model",
                "value": spec.model,
                "message": f"{spec.model!r} is an SDXL refiner: it finishes what an SDXL base "
                "starts; name an sdxl model in `model` and this one in `refiner`",
            }
        return None
    if spec.refiner not in known:
        return {
            "field": "refiner",
            "value": spec.refiner,
            "message": f"unknown model {spec.refiner!r}; known: {', '.join(known)}",
        }
    for field, name, wanted in (
        ("refiner", spec.refiner, "sdxl-refiner"),
        ("model", str(spec.model), "sdxl"),
    ):
        family = families.get(name)
        if family is not None and family != wanted:
            return {
                "field": field,
                "value": name,
                "message": f"a job with a refiner needs an sdxl base and an sdxl-refiner; "
                f"{name!r} is {family}",
            }
    return None


def submit_batch(
    ledger: Ledger,
    settings: Settings,
    job_dicts: Iterable[Mapping[str, Any]],
    *,
    meta: dict[str, str] | None = None,
    native_sizes: Mapping[str, int] | None = None,
    families: Mapping[str, str] | None = None,
    tenant: str = DEFAULT_TENANT,
    quota: Quota | None = None,
    loras: LoraLibrary | None = None,
    storage: Storage | None = None,
) -> Accepted:
    """Validate, then record every job as `queued`; nothing is written if any job is refused,
    or if the batch would take the ledger past its budget (`ledger_max_bytes`).
    The batch belongs to `tenant` (the caller's); its `quota` (None: no tenant limits) is
    applied here, and its submit rate counted only once every job has passed. Base64 init
    images are stored in `storage` (opened from the settings when None) and the jobs hold
    their references (`producer.init_refs`)."""
    specs = validate_jobs(job_dicts, settings, native_sizes, families, quota=quota, loras=loras)
    images = prepare_init_images(specs, settings, tenant, storage)
    specs = images.specs
    batch_id = new_batch_id()
    plan = ledger.plan_batch(batch_id, specs, meta)
    ledger.budget.check(
        plan.estimate_bytes,
        len(specs),
        max_bytes=settings.ledger_max_bytes,
        headroom=settings.ledger_headroom,
    )  # BatchTooLarge or LedgerFull: nothing is written that cannot be afforded
    if quota is not None:
        quota.check_queued(ledger, len(specs))  # a look; the commit checks max_queued_jobs again
        quota.check_rate(ledger, take=True)  # after validation: a refused batch costs nothing
    images.store()  # before the jobs that name them; a batch refused now leaves reusable ones
    max_open = quota.max_open() if quota is not None else None
    job_ids = ledger.create_batch(
        batch_id, specs, meta=meta, tenant=tenant, plan=plan, max_open=max_open
    )
    log.info("batch %s: %d jobs queued for tenant %s", batch_id, len(job_ids), tenant)
    return Accepted(batch_id=batch_id, job_ids=job_ids)
