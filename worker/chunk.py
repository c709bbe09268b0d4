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
from traceback import format_exc
from typing import Any

import torch
from PIL import Image

from shared.config import Settings
from shared.errors import InvalidJob, RenderCancelled, StorageError, WorkerStopping
from shared.jobs import JobSpec, JobState, batch_of
from shared.ledger import Ledger
from shared.metadata import encode_png
from shared.storage import Storage, image_key
from worker.accel import render_in_passes
from worker.failures import free_memory, hand_back, put_with_retry, step_callback
from worker.models import LoadedModel
from worker.output import OutputPipeline
from worker.rows import pass_params, row_for
from worker.sampler import PassParams, Row

__all__ = ["ChunkOutcome", "WorkerContext", "process_chunk"]

log = logging.getLogger(__name__)

_CANCELLED = "cancelled while rendering"


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
    # Stores chunk k while chunk k+1 renders; None stores in line (tests, `sdfarm render`).
    output: OutputPipeline | None = None
    # Set on SIGTERM (worker.main): a pass still rendering after this monotonic time stops and
    # its jobs are handed back.
    stop_by: float | None = None
    # After an upload spent all its tries the store counts as down until this monotonic time:
    # later uploads try once, so a chunk hands its images back in seconds, not minutes.
    storage_down_until: float = 0.0


@dataclass
class ChunkOutcome:
    """Which jobs of a chunk ended how (for logs and tests)."""

    succeeded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)  # moved to `running` by this delivery


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
        self.in_pass: list[str] = self.job_ids  # the rows of the pass rendering now
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
        """Called after every sampling step; raises once every job of the pass is cancelled."""
        self.progress = (step, steps)
        if self.cancelled and self.cancelled.issuperset(self.in_pass):
            raise RenderCancelled(f"all {len(self.in_pass)} jobs of the pass were cancelled")

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
    outcome.claimed = list(ctx.current)
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
    params = pass_params(claimed[0][1])
    rows, ready = [], []
    for job_id, spec in claimed:
        # A job whose init image cannot be read fails (or waits for the store) on its own.
        try:
            rows.append(row_for(spec, ctx.storage))
        except InvalidJob as e:
            _finish(ctx, job_id, JobState.FAILED, {"error": str(e)}, outcome)
            continue
        except StorageError as e:
            _storage_failed(ctx, job_id, e, outcome, "its init image could not be read")
            continue
        ready.append((job_id, spec))
    claimed = ready
    ids = [job_id for job_id, _ in claimed]
    if not claimed:
        return
    with _ChunkMonitor(ctx, ids) as monitor:
        items = list(zip(claimed, rows, strict=True))
        _render_rows(ctx, model, params, items, monitor, outcome)


def _render_rows(  # noqa: PLR0917 - called from two places, each argument named there
    ctx: WorkerContext,
    model: LoadedModel,
    params: PassParams,
    items: list[tuple[tuple[str, JobSpec], Row]],
    monitor: _ChunkMonitor,
    outcome: ChunkOutcome,
) -> None:
    """Render `items` together and store them; when that fails, narrow the failure down.

    A CUDA out-of-memory error splits the rows in halves and tries each; any other failure
    renders the rows one by one, so a poison job fails alone (after its attempts, with the reason)
    while its batch-mates still succeed. A failed pass's tensors are freed before the next try.
    """
    claimed = [job for job, _ in items]
    ids = [job_id for job_id, _ in claimed]
    if ctx.stop_by is not None and time.monotonic() > ctx.stop_by:
        for job_id in ids:
            _hand_back(ctx, job_id, "the worker shut down before rendering it", outcome)
        return
    monitor.in_pass = ids
    rows = [row for _, row in items]
    failure: str | None = None
    out_of_memory = False
    try:
        # In several passes when the chunk would not fit in the device's memory.
        result = render_in_passes(
            model,
            rows,
            params,
            on_step=step_callback(ctx, monitor.on_step, [row.prompt for row in rows]),
            max_pass_pixels=ctx.settings.max_pass_pixels,
        )
    except RenderCancelled:
        for job_id in ids:
            _finish(ctx, job_id, JobState.CANCELLED, {"error": _CANCELLED}, outcome)
        return
    except WorkerStopping as e:
        for job_id in ids:
            _hand_back(ctx, job_id, str(e), outcome)
        return
    # Logged as text, never as the exception: a log handler that keeps records (pytest's, a
    # memory handler) would keep the traceback, its frames and their tensors alive.
    except torch.cuda.OutOfMemoryError as e:
        log.warning("chunk %s: out of memory on %d rows: %s", ids[0], len(ids), str(e))
        out_of_memory = True
    except Exception as e:  # not swallowed: narrowed down below, then recorded per job
        failure = f"render failed: {type(e).__name__}: {e}"
        log.error("chunk %s: a pass of %d rows failed\n%s", ids[0], len(ids), format_exc())
    if out_of_memory or failure is not None:
        # Out here, not in the except blocks: the exception, its traceback and the tensors that
        # the traceback's frames held are gone, so collecting now really frees them.
        free_memory(model.device)
        _narrow_down(ctx, model, params, items, failure, monitor, outcome)
        return
    to_store: list[tuple[str, JobSpec, Any, list[str]]] = []
    for index, ((job_id, spec), pixels) in enumerate(zip(claimed, result.images, strict=True)):
        if job_id in monitor.cancelled:
            _finish(ctx, job_id, JobState.CANCELLED, {"error": _CANCELLED}, outcome)
            continue
        if pixels is None:  # the precision guard refused to store a NaN or black image
            _finish(ctx, job_id, JobState.FAILED, {"error": result.errors[index]}, outcome)
            continue
        to_store.append((job_id, spec, pixels, result.warnings[index]))
    _hand_to_output(ctx, model, to_store, result.timings, len(claimed), outcome)


def _narrow_down(  # noqa: PLR0917 - one call site, each argument named there
    ctx: WorkerContext,
    model: LoadedModel,
    params: PassParams,
    items: list[tuple[tuple[str, JobSpec], Row]],
    failure: str | None,
    monitor: _ChunkMonitor,
    outcome: ChunkOutcome,
) -> None:
    """After a failed pass: halves for out of memory (`failure` None), else one row at a time."""
    first = items[0][0][0]
    if len(items) == 1:
        reason = failure or (
            f"CUDA out of memory even for a single {params.width}x{params.height} image"
        )
        _give_back_or_fail(ctx, first, reason, outcome)
        return
    if failure is None:
        half = len(items) // 2
        parts = [items[:half], items[half:]]
        log.warning("chunk %s: trying again in halves of %d rows", first, half)
    else:
        parts = [[item] for item in items]
        log.warning("chunk %s: rendering its %d rows one by one", first, len(items))
    for part in parts:
        _render_rows(ctx, model, params, part, monitor, outcome)


def _hand_to_output(  # noqa: PLR0917 - one call site, each argument named there
    ctx: WorkerContext,
    model: LoadedModel,
    to_store: list[tuple[str, JobSpec, Any, list[str]]],
    timings: dict[str, float],
    rows: int,
    outcome: ChunkOutcome,
) -> None:
    """Store the rendered rows: in the worker's output pipeline when it has one, else now.

    In the pipeline the stores run while the next chunk renders, so `outcome` fills in later.
    """

    def store() -> None:
        for job_id, spec, pixels, warnings in to_store:
            _store_one(ctx, model, job_id, spec, pixels, timings, rows, outcome, warnings)

    if ctx.output is None or not to_store:
        store()
    else:
        ctx.output.submit(to_store[0][0], store)


def _store_one(  # noqa: PLR0917 - one call site, each argument named there
    ctx: WorkerContext,
    model: LoadedModel,
    job_id: str,
    spec: JobSpec,
    pixels: Any,
    timings: dict[str, float],
    rows: int,
    outcome: ChunkOutcome,
    warnings: list[str],
) -> None:
    spec_dict = spec.model_dump()
    key = image_key(ctx.storage.prefix, batch_of(job_id), job_id)
    data = encode_png(
        Image.fromarray(pixels),
        spec_dict,
        model_name=model.name,
        model_hash=model.model_hash,
        extra={"job_id": job_id, "warnings": warnings},
    )
    try:
        put_with_retry(ctx, job_id, key, data, keep_alive=outcome.claimed)
    except StorageError as e:
        _storage_failed(ctx, job_id, e, outcome, "its image could not be stored")
        return
    fields = {
        "result": {"key": key, "uri": ctx.storage.describe(key), "bytes": len(data)},
        "timings": {**timings, "batch_rows": rows},
        "model_hash": model.model_hash or "",
        "finished_at": time.time(),
        "warnings": warnings,  # dropped prompt words, an fp32 VAE retry: shown by API and CLI
    }
    _finish(ctx, job_id, JobState.SUCCEEDED, fields, outcome)
    ctx.images_done += 1


def _storage_failed(
    ctx: WorkerContext, job_id: str, error: StorageError, outcome: ChunkOutcome, what: str
) -> None:
    """Not the job's fault: back to `queued` without charging an attempt, while the store has
    been failing it for less than `storage_give_up_s`; after that, failed with the store's error
    (a job is never `succeeded` without its object). `what` says what failed, for the error."""
    record = ctx.ledger.job(job_id)
    now = time.time()
    since = float(record.get("storage_failing_since") or now)
    limit_s = ctx.settings.storage_give_up_s
    if limit_s and now - since >= limit_s:
        failing_s = now - since
        failing = f"{failing_s:.0f} s" if failing_s < 120 else f"{failing_s / 60:.0f} min"
        message = (
            f"{what} for {failing} ({error}); check the S3 store, its bucket and the workers' "
            "credentials, then retry the job"
        )
        _finish(ctx, job_id, JobState.FAILED, {"error": message}, outcome)
        return
    reason = f"storage unavailable: {error}"
    fields = {"storage_failing_since": since}
    if hand_back(ctx.ledger, job_id, reason, owner=ctx.worker_id, record=record, fields=fields):
        outcome.requeued.append(job_id)


def _finish(
    ctx: WorkerContext, job_id: str, state: JobState, fields: dict[str, Any], outcome: ChunkOutcome
) -> None:
    fields.setdefault("finished_at", time.time())
    result = ctx.ledger.transition(job_id, [JobState.RUNNING], state, fields, owner=ctx.worker_id)
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
        job_id, [JobState.RUNNING], JobState.QUEUED, {"last_error": reason}, owner=ctx.worker_id
    )
    if result.applied:
        outcome.requeued.append(job_id)
        log.warning("job %s: handed back for another attempt: %s", job_id, reason)


def _hand_back(ctx: WorkerContext, job_id: str, reason: str, outcome: ChunkOutcome) -> None:
    if hand_back(ctx.ledger, job_id, reason, owner=ctx.worker_id):
        outcome.requeued.append(job_id)
