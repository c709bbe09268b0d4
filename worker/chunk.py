"""One chunk of compatible jobs, from the Celery message to the ledger, in five steps.

1. Claim (`worker.claim`): skip jobs that are not `queued` here, move the rest to `running`.
2. Build rows (`worker.rows`): read each job's init image; a job whose row cannot be built fails
   (or waits for the store) alone.
3. Render (`worker.render`): one batched pass, sized to memory, narrowed down on failure.
4. Store (`worker.upload`): encode and upload each image, in the output pipeline when there is one.
5. Report (`worker.report`): the ledger moves, each of them owned by this worker.

From the claim until the chunk is handed to storage, a monitor thread renews the chunk's leases,
writes its progress and collects cancel requests (`worker.monitor`). A job becomes `succeeded`
only after its object is stored; a duplicated delivery finds its jobs not `queued` and does
nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from shared.errors import FailureReason, InvalidJob, StorageError
from shared.init_images import ImageLimits
from shared.routing import route_models
from worker.claim import claim_jobs
from worker.context import ChunkOutcome, WorkerContext
from worker.loras import LoraSet
from worker.models import LoadedModel
from worker.monitor import ChunkMonitor
from worker.render import NotRendered, Rendered, render_rows
from worker.report import Reporter
from worker.rows import RowJob, Unreadable, build_rows, pass_params
from worker.upload import store_rendered
from worker.vaes import swap_vae

__all__ = ["ChunkOutcome", "WorkerContext", "process_chunk"]

log = logging.getLogger(__name__)


def process_chunk(ctx: WorkerContext, job_ids: Sequence[str], model_name: str) -> ChunkOutcome:
    """Claim, render, store and report one chunk; what it did as far as it knows on return."""
    outcome = ChunkOutcome()
    # `model_name` is the chunk's route: a model, or `base+refiner` (shared/jobs.py).
    held = [ctx.models.get(name) for name in route_models(model_name)]
    models = [m for m in held if m is not None]
    reporter = Reporter(ctx.ledger, ctx.settings, ctx.worker_id)
    # 1. Claim.
    claim = claim_jobs(
        ctx.ledger, ctx.worker_id, job_ids, model_name, holds_model=len(models) == len(held)
    )
    outcome.skipped += claim.skipped
    outcome.failed += claim.failed
    if not claim.jobs or len(models) != len(held):
        return outcome
    model, refiner = models[0], (models[1] if len(models) > 1 else None)
    mismatch = _family_mismatch(model, refiner)
    if mismatch is None:  # a chunk's jobs share their VAE: the compatibility key holds it
        model, refiner, mismatch = swap_vae(ctx.vaes, claim.jobs[0].spec.vae, model, refiner)
    if mismatch is not None:  # the API could not read the folders to refuse it at submit
        for job in claim.jobs:
            outcome.add(job.job_id, reporter.fail_now(job.job_id, mismatch, INVALID))
        return outcome
    outcome.claimed = [job.job_id for job in claim.jobs]
    ctx.state.current = outcome.claimed
    interval_s = min(ctx.settings.progress_interval_s or 0.25, ctx.settings.lease_s / 3)
    monitor = ChunkMonitor(ctx.ledger, ctx.worker_id, outcome.claimed, interval_s=interval_s)
    try:
        with monitor:
            # 2. Build rows.
            limits = ImageLimits.of(ctx.settings)  # the bounds submit applied, again
            ready, unreadable = build_rows(claim.jobs, ctx.storage, limits)
            for bad in unreadable:
                outcome.add(bad.job.job_id, _unreadable(reporter, bad))
            # 3. Render, with the chunk's LoRAs (all its jobs': the compatibility key holds them).
            params = pass_params(claim.jobs[0].spec)
            lora_hashes = _activate_loras(
                ctx, model, params.loras, ready, reporter=reporter, outcome=outcome
            )
            if lora_hashes is None:
                ready = []
            results = (
                render_rows(
                    model,
                    params,
                    ready,
                    monitor=monitor,
                    state=ctx.state,
                    settings=ctx.settings,
                    refiner=refiner,
                )
                if ready
                else []
            )
            rendered = [result for result in results if isinstance(result, Rendered)]
            for result in results:
                if isinstance(result, NotRendered):
                    outcome.add(result.job.job_id, _not_rendered(reporter, result))
            # 4. and 5. Store, then report.
            _store(ctx, reporter, model, rendered, outcome, refiner=refiner, loras=lora_hashes)
    finally:
        ctx.state.current = []
    return outcome


INVALID = FailureReason.INVALID_INPUT


def _family_mismatch(model: LoadedModel, refiner: LoadedModel | None) -> str | None:
    """Why these models cannot render the chunk's jobs, if they cannot: a refiner only finishes
    what an SDXL base starts."""
    if refiner is None and model.family == "sdxl-refiner":
        return f"{model.name} is an SDXL refiner: name it in `refiner` of a job for an sdxl model"
    if refiner is not None and (model.family, refiner.family) != ("sdxl", "sdxl-refiner"):
        return (
            f"a job with a refiner needs an sdxl base and an sdxl-refiner; {model.name} is "
            f"{model.family} and {refiner.name} is {refiner.family}"
        )
    return None


def _activate_loras(
    ctx: WorkerContext,
    model: LoadedModel,
    loras: LoraSet,
    ready: Sequence[RowJob],
    *,
    reporter: Reporter,
    outcome: ChunkOutcome,
) -> dict[str, str] | None:
    """Make the chunk's LoRAs the model's active adapters (none: all off); their A1111 hashes by
    name, or None when they cannot be loaded, its jobs then failed (a LoRA file that does not
    fit) or handed back (its disk failed)."""
    try:
        if ctx.loras is None:
            if loras:
                raise InvalidJob("this worker has no LoRA library: set SDFARM_LORA_DIR")
            return {}
        return ctx.loras.activate(model, loras)
    except StorageError as e:
        for item in ready:
            outcome.add(item.job.job_id, reporter.storage_failed(item.job.job_id, e, "its LoRA"))
    except InvalidJob as e:
        for item in ready:
            outcome.add(item.job.job_id, reporter.fail_now(item.job.job_id, str(e), INVALID))
    return None


def _unreadable(reporter: Reporter, bad: Unreadable) -> str:
    if isinstance(bad.error, StorageError):
        return reporter.storage_failed(
            bad.job.job_id, bad.error, "its init image could not be read"
        )
    return reporter.fail_now(bad.job.job_id, str(bad.error), INVALID)


def _not_rendered(reporter: Reporter, result: NotRendered) -> str:
    job_id = result.job.job_id
    if result.outcome in ("cancelled", "failed"):
        return reporter.fail_now(job_id, result.reason, result.code)
    charge = result.outcome == "retry"  # a hand-back is the worker's stop, not the job's fault
    return reporter.give_back(job_id, result.reason, charge_attempt=charge, code=result.code)


def _store(
    ctx: WorkerContext,
    reporter: Reporter,
    model: LoadedModel,
    rendered: list[Rendered],
    outcome: ChunkOutcome,
    *,
    refiner: LoadedModel | None,
    loras: dict[str, str] | None = None,
) -> None:
    """Store the images now, or in the output pipeline while the next chunk renders."""
    if not rendered:
        return

    def store() -> list[tuple[str, str]]:
        return store_rendered(
            reporter,
            ctx.storage,
            model,
            rendered,
            state=ctx.state,
            refiner=refiner,
            lora_hashes=loras or {},
        )

    if ctx.output is None:
        for job_id, state in store():
            outcome.add(job_id, state)
        return
    first = rendered[0].job.job_id
    outcome.storing = [item.job.job_id for item in rendered]

    def store_and_log() -> None:
        states = [state or "skipped" for _, state in store()]
        log.info("chunk %s: stored %d images: %s", first, len(states), ", ".join(states))

    ctx.output.submit(first, store_and_log)
