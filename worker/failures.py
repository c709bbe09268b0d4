"""How a worker lives through failures that are not the job's: storage outages, out-of-memory
errors and shutdowns. `worker.chunk` decides what to do with a job; these are the moves.

- Uploads are retried with doubling pauses; when the store stays down, the job is handed back to
  `queued` without charging an attempt, so an outage delays work but does not fail it, up to
  `storage_give_up_s` from the first such hand-back: then the job fails with the store's error
  (a store that refuses the workers' credentials would otherwise cycle its jobs forever).
- After a failed pass, its tensors are collected and CUDA's cache emptied before the next try.
- On SIGTERM (`worker.main` sets `stop_by`), a pass still rendering at the deadline stops at its
  next step and its jobs are handed back, again without charging an attempt.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis
import torch

from shared.errors import StorageError, WorkerStopping
from shared.jobs import JobState
from shared.ledger import Ledger
from worker.faults import step_hook

if TYPE_CHECKING:
    from worker.chunk import WorkerContext

__all__ = ["free_memory", "hand_back", "put_with_retry", "step_callback"]

log = logging.getLogger(__name__)


def put_with_retry(
    ctx: WorkerContext, job_id: str, key: str, data: bytes, keep_alive: Sequence[str]
) -> None:
    """Upload with retries and doubling pauses; StorageError once the tries are spent.

    While it waits it renews the leases of `keep_alive` (the chunk's jobs): stores may run after
    the chunk monitor stopped, and a lapsed lease would make the reconciler charge an attempt.
    After one upload spent its tries the store counts as down for a while, and later uploads try
    once, so a chunk hands its images back in seconds rather than minutes.
    """
    settings = ctx.settings
    tries = 1 if time.monotonic() < ctx.storage_down_until else settings.storage_put_attempts
    pause_s = settings.storage_backoff_s
    for attempt in range(1, tries + 1):
        try:
            ctx.storage.put(key, data, "image/png")
        except StorageError as e:
            if attempt == tries:
                ctx.storage_down_until = time.monotonic() + settings.storage_backoff_s * 2**tries
                raise
            log.warning(
                "job %s: upload try %d of %d failed (%s); next in %.1f s",
                job_id,
                attempt,
                tries,
                e,
                pause_s,
            )
            with contextlib.suppress(redis.RedisError):
                ctx.ledger.renew_leases(ctx.worker_id, list(keep_alive) or [job_id])
            time.sleep(pause_s)
            pause_s *= 2
        else:
            ctx.storage_down_until = 0.0
            return


def hand_back(
    ledger: Ledger,
    job_id: str,
    reason: str,
    *,
    owner: str | None = None,
    record: dict[str, Any] | None = None,
    fields: dict[str, Any] | None = None,
) -> bool:
    """`running` → `queued` without charging an attempt (the farm failed, not the job).

    `record` is the job's, when the caller has just read it; `fields` are written with the move.
    """
    record = record or ledger.job(job_id)
    fields = {**(fields or {}), "last_error": reason, "attempts": max(0, record["attempts"] - 1)}
    result = ledger.transition(job_id, [JobState.RUNNING], JobState.QUEUED, fields, owner=owner)
    if result.applied:
        log.warning("job %s: handed back, no attempt charged: %s", job_id, reason)
    return result.applied


def free_memory(device: torch.device) -> None:
    """Release what a failed pass left behind: its tensors now, and CUDA's cached blocks.

    Call it outside the `except` block: until then the traceback's frames hold the tensors.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_callback(
    ctx: WorkerContext, on_step: Callable[[int, int], None], prompts: Sequence[str]
) -> Callable[[int, int], None]:
    """`on_step` (progress and cancels) plus the shutdown deadline and the fault-suite hooks."""
    hook = step_hook(ctx.settings, prompts)

    def check(step: int, steps: int) -> None:
        on_step(step, steps)
        if ctx.stop_by is not None and time.monotonic() > ctx.stop_by:
            raise WorkerStopping(
                f"worker {ctx.worker_id} shut down at step {step} of {steps}; handed back"
            )
        if hook is not None:
            hook(step)

    return check
