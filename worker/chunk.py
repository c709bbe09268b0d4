"""Rendering one chunk: claim its jobs in the ledger, render them as one pass, store, report.

A job becomes `succeeded` only after its object is stored. Jobs that are already terminal or
running elsewhere are skipped on entry, so a duplicated delivery does nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from shared.config import Settings
from shared.errors import RenderCancelled, SdfarmError, StorageError
from shared.jobs import JobSpec, JobState, batch_of
from shared.ledger import Ledger
from shared.metadata import encode_png
from shared.storage import Storage, image_key
from worker.models import LoadedModel
from worker.sampler import PassParams, Row, render_pass

__all__ = ["ChunkOutcome", "WorkerContext", "process_chunk"]

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a worker process holds for its whole life: settings, ledger, storage, models."""

    settings: Settings
    ledger: Ledger
    storage: Storage
    models: dict[str, LoadedModel]
    worker_id: str
    images_done: int = 0
    current: list[str] = field(default_factory=list)


@dataclass
class ChunkOutcome:
    """Which jobs of a chunk ended how (for logs and tests)."""

    succeeded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _ChunkMonitor:
    """A background thread that does the chunk's Redis work, so the sampling loop never waits.

    Every `progress_interval_s` it renews the chunk's leases, writes the latest step and reads
    cancel requests; the per-step callback only reads and writes memory.
    """

    def __init__(self, ctx: WorkerContext, job_ids: Sequence[str]) -> None:
        self.ctx = ctx
        self.job_ids = list(job_ids)
        self.cancelled: set[str] = set()
        self.progress: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chunk-monitor", daemon=True)

    def __enter__(self) -> _ChunkMonitor:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def on_step(self, step: int, steps: int) -> None:
        """Called after every sampling step; raises once every job of the chunk is cancelled."""
        self.progress = (step, steps)
        if self.cancelled and self.cancelled.issuperset(self.job_ids):
            raise RenderCancelled(f"all {len(self.job_ids)} jobs of the chunk were cancelled")

    def _run(self) -> None:
        interval = min(self.ctx.settings.progress_interval_s or 0.25, self.ctx.settings.lease_s / 3)
        while not self._stop.wait(interval):
            self._beat()

    def _beat(self) -> None:
        try:
            self.cancelled |= self.ctx.ledger.renew_leases(
                self.ctx.worker_id, self.job_ids, self.progress
            )
        except Exception as e:  # a Redis blip must not kill the render; the lease may lapse
            log.warning("heartbeat for chunk %s failed: %s", self.job_ids[0], e)


def process_chunk(ctx: WorkerContext, job_ids: Sequence[str], model_name: str) -> ChunkOutcome:
    """Claim, render, store and report one chunk of compatible jobs."""
    outcome = ChunkOutcome()
    model = ctx.models.get(model_name)
    claimed: list[tuple[str, JobSpec]] = []
    for job_id, record in zip(job_ids, ctx.ledger.jobs(job_ids), strict=True):
        if record is None or record["state"] != JobState.QUEUED.value:
            outcome.skipped.append(job_id)
            continue
        spec = JobSpec.model_validate(record["spec"])
        if model is None or spec.model != model_name:
            # Routed to a worker without the model: hand it back for a worker that has it.
            outcome.skipped.append(job_id)
            continue
        started = ctx.ledger.transition(
            job_id,
            [JobState.QUEUED],
            JobState.RUNNING,
            {"worker": ctx.worker_id, "started_at": time.time(), "step": 0, "steps": spec.steps},
        )
        if started.applied:
            claimed.append((job_id, spec))
        else:
            outcome.skipped.append(job_id)
    if outcome.skipped:
        log.info("chunk %s: skipped %d jobs not queued here", job_ids[0], len(outcome.skipped))
    if not claimed or model is None:
        return outcome
    ctx.current = [job_id for job_id, _ in claimed]
    try:
        _render_and_store(ctx, model, claimed, outcome)
    finally:
        ctx.current = []
    return outcome


def _render_and_store(
    ctx: WorkerContext,
    model: LoadedModel,
    claimed: list[tuple[str, JobSpec]],
    outcome: ChunkOutcome,
) -> None:
    ids = [job_id for job_id, _ in claimed]
    first = claimed[0][1]
    params = PassParams(
        steps=first.steps, width=first.width, height=first.height, scheduler=first.scheduler
    )
    rows = [
        Row(prompt=s.prompt, negative_prompt=s.negative_prompt, seed=_seed(s), guidance=s.guidance)
        for _, s in claimed
    ]
    with _ChunkMonitor(ctx, ids) as monitor:
        try:
            result = render_pass(model, rows, params, on_step=monitor.on_step)
        except RenderCancelled:
            for job_id in ids:
                _finish(
                    ctx, job_id, JobState.CANCELLED, {"error": "cancelled while rendering"}, outcome
                )
            return
        except Exception as e:  # the pass failed for every row: record why, per job
            log.exception("chunk %s: render failed", ids[0])
            for job_id, _ in claimed:
                _give_back_or_fail(ctx, job_id, f"render failed: {type(e).__name__}: {e}", outcome)
            return
        for (job_id, spec), pixels in zip(claimed, result.images, strict=True):
            if job_id in monitor.cancelled:
                _finish(
                    ctx, job_id, JobState.CANCELLED, {"error": "cancelled while rendering"}, outcome
                )
                continue
            _store_one(ctx, model, job_id, spec, pixels, result.timings, len(claimed), outcome)


def _store_one(  # noqa: PLR0917 - one call site, each argument named there
    ctx: WorkerContext,
    model: LoadedModel,
    job_id: str,
    spec: JobSpec,
    pixels: Any,
    timings: dict[str, float],
    rows: int,
    outcome: ChunkOutcome,
) -> None:
    spec_dict = spec.model_dump()
    key = image_key(ctx.storage.prefix, batch_of(job_id), job_id)
    data = encode_png(
        Image.fromarray(pixels),
        spec_dict,
        model_name=model.name,
        model_hash=model.model_hash,
        extra={"job_id": job_id},
    )
    try:
        ctx.storage.put(key, data, "image/png")
    except StorageError as e:
        log.warning("job %s: %s", job_id, e)
        _give_back_or_fail(ctx, job_id, str(e), outcome)
        return
    fields = {
        "result": {"key": key, "uri": ctx.storage.describe(key), "bytes": len(data)},
        "timings": {**timings, "batch_rows": rows},
        "model_hash": model.model_hash or "",
        "finished_at": time.time(),
    }
    _finish(ctx, job_id, JobState.SUCCEEDED, fields, outcome)
    ctx.images_done += 1


def _finish(
    ctx: WorkerContext, job_id: str, state: JobState, fields: dict[str, Any], outcome: ChunkOutcome
) -> None:
    fields.setdefault("finished_at", time.time())
    result = ctx.ledger.transition(job_id, [JobState.RUNNING], state, fields)
    if not result.applied:
        log.info("job %s: already %s, not marking %s", job_id, result.previous, state.value)
        outcome.skipped.append(job_id)
        return
    getattr(outcome, state.value).append(job_id)
    log.info("job %s: %s", job_id, state.value)


def _give_back_or_fail(ctx: WorkerContext, job_id: str, reason: str, outcome: ChunkOutcome) -> None:
    """Retry later while attempts remain; then fail with the reason of the last attempt."""
    record = ctx.ledger.job(job_id)
    if record["attempts"] >= ctx.settings.max_attempts:
        _finish(
            ctx,
            job_id,
            JobState.FAILED,
            {"error": f"{reason} (after {record['attempts']} attempts)"},
            outcome,
        )
        return
    result = ctx.ledger.transition(
        job_id, [JobState.RUNNING], JobState.QUEUED, {"last_error": reason}
    )
    if result.applied:
        outcome.requeued.append(job_id)
        log.warning("job %s: handed back for another attempt: %s", job_id, reason)


def _seed(spec: JobSpec) -> int:
    if spec.seed is None:
        raise SdfarmError("job reached a worker without a seed; seeds are fixed at submit")
    return spec.seed
