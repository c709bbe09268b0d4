"""Step 3 of a chunk: render its rows, and narrow a failure down to the rows that cause it.

1. Render the rows together, in passes sized to the device's memory (`render_in_passes`).
2. A CUDA out-of-memory error: free what the pass left, split the rows in halves, try each.
3. Any other failure: free what the pass left, render the rows one by one, so a poison job fails
   alone (after its attempts, with the reason) while its batch-mates still render.
4. A single row that still fails is given back to the ledger for another attempt.
5. Every step checks the cancels (all rows of the pass cancelled: stop) and the shutdown deadline
   (passed: stop, hand the rows back, no attempt charged).

Each row comes out as `Rendered` (pixels to store) or `NotRendered` (what the ledger should do).
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from traceback import format_exc
from typing import Literal

import numpy as np
import torch

from shared.config import Settings
from shared.errors import FailureReason, RenderCancelled, WorkerStopping
from worker.claim import Claimed
from worker.context import WorkerState
from worker.faults import step_hook
from worker.models import LoadedModel
from worker.monitor import ChunkMonitor
from worker.passes import render_in_passes
from worker.rows import RowJob
from worker.sampler import PassParams, PassResult

__all__ = ["CANCELLED", "NotRendered", "Rendered", "render_rows"]

log = logging.getLogger(__name__)

CANCELLED = "cancelled while rendering"


@dataclass(frozen=True)
class Rendered:
    """A row's image, ready to store."""

    job: Claimed
    pixels: np.ndarray
    warnings: list[str]
    timings: dict[str, float]
    pass_rows: int  # rows in the pass that rendered it


@dataclass(frozen=True)
class NotRendered:
    """A row without an image, and what becomes of its job.

    `cancelled`: it was cancelled; `failed`: it failed for good (the precision guard refused its
    image); `retry`: its attempt failed, another may succeed; `hand_back`: the worker stopped,
    the job was not at fault.
    """

    job: Claimed
    outcome: Literal["cancelled", "failed", "retry", "hand_back"]
    reason: str
    code: FailureReason


@dataclass(frozen=True)
class _PassFailed:
    reason: str
    out_of_memory: bool

    @property
    def code(self) -> FailureReason:
        return FailureReason.OUT_OF_MEMORY if self.out_of_memory else FailureReason.RENDER_FAILED


def render_rows(
    model: LoadedModel,
    params: PassParams,
    items: Sequence[RowJob],
    *,
    monitor: ChunkMonitor,
    state: WorkerState,
    settings: Settings,
    refiner: LoadedModel | None = None,
) -> list[Rendered | NotRendered]:
    """Render `items`, narrowing failures down as the module says; one result per item (with
    `refiner`, an SDXL refiner finishes each image: worker/sampler.py)."""
    results: list[Rendered | NotRendered] = []
    todo: deque[list[RowJob]] = deque([list(items)])
    while todo:
        group = todo.popleft()
        if _stopping(state):
            reason = "the worker shut down before rendering it"
            results += [NotRendered(i.job, "hand_back", reason, FailureReason.OTHER) for i in group]
            continue
        attempt = _try_pass(
            model, params, group, monitor=monitor, state=state, settings=settings, refiner=refiner
        )
        if not isinstance(attempt, _PassFailed):
            results += attempt
            continue
        # Out here, not in an except block: the exception, its traceback and the tensors its
        # frames held are gone, so collecting now really frees them.
        _free_memory(model.device)
        first = group[0].job.job_id
        if len(group) == 1:
            code = FailureReason.OUT_OF_MEMORY if attempt.out_of_memory else None
            results.append(
                NotRendered(
                    group[0].job, "retry", attempt.reason, code or FailureReason.RENDER_FAILED
                )
            )
        elif attempt.out_of_memory:
            half = len(group) // 2
            log.warning("chunk %s: trying again in halves of %d rows", first, half)
            todo.extendleft([group[half:], group[:half]])
        else:
            log.warning("chunk %s: rendering its %d rows one by one", first, len(group))
            todo.extendleft([[item] for item in reversed(group)])
    return results


def _try_pass(
    model: LoadedModel,
    params: PassParams,
    group: list[RowJob],
    *,
    monitor: ChunkMonitor,
    state: WorkerState,
    settings: Settings,
    refiner: LoadedModel | None,
) -> list[Rendered | NotRendered] | _PassFailed:
    """One try at rendering `group` together: its rows' results, or why the pass failed."""
    ids = [item.job.job_id for item in group]
    monitor.in_pass = ids
    rows = [item.row for item in group]
    try:
        result = render_in_passes(
            model,
            rows,
            params,
            on_step=_step_checks(monitor, state, settings, [row.prompt for row in rows]),
            max_pass_pixels=settings.max_pass_pixels,
            refiner=refiner,
        )
    except RenderCancelled:
        return [NotRendered(i.job, "cancelled", CANCELLED, FailureReason.CANCELLED) for i in group]
    except WorkerStopping as e:
        return [NotRendered(i.job, "hand_back", str(e), FailureReason.OTHER) for i in group]
    # Logged as text, never as the exception: a log handler that keeps records (pytest's, a
    # memory handler) would keep the traceback, its frames and their tensors alive.
    except torch.cuda.OutOfMemoryError as e:
        log.warning("chunk %s: out of memory on %d rows: %s", ids[0], len(ids), str(e))
        reason = f"CUDA out of memory even for a single {params.width}x{params.height} image"
        return _PassFailed(reason, out_of_memory=True)
    except Exception as e:  # not swallowed: narrowed down by the caller, then recorded per job
        log.error("chunk %s: a pass of %d rows failed\n%s", ids[0], len(ids), format_exc())
        return _PassFailed(f"render failed: {type(e).__name__}: {e}", out_of_memory=False)
    return _per_row(group, result, monitor.cancelled)


def _per_row(
    group: list[RowJob], result: PassResult, cancelled: set[str]
) -> list[Rendered | NotRendered]:
    out: list[Rendered | NotRendered] = []
    for index, item in enumerate(group):
        pixels = result.images[index]
        if item.job.job_id in cancelled:
            out.append(NotRendered(item.job, "cancelled", CANCELLED, FailureReason.CANCELLED))
        elif pixels is None:  # the precision guard refused to store a NaN or black image
            error = result.errors[index] or "no image"
            out.append(NotRendered(item.job, "failed", error, FailureReason.RENDER_FAILED))
        else:
            warnings = result.warnings[index]
            out.append(Rendered(item.job, pixels, warnings, result.timings, len(group)))
    return out


def _step_checks(
    monitor: ChunkMonitor, state: WorkerState, settings: Settings, prompts: Sequence[str]
) -> Callable[[int, int], None]:
    """After every step: progress and cancels, the shutdown deadline, the fault-suite hooks."""
    hook = step_hook(settings, prompts)

    def check(step: int, steps: int) -> None:
        monitor.on_step(step, steps)
        if _stopping(state):
            raise WorkerStopping(f"the worker shut down at step {step} of {steps}; handed back")
        if hook is not None:
            hook(step)

    return check


def _stopping(state: WorkerState) -> bool:
    return state.stop_by is not None and time.monotonic() > state.stop_by


def _free_memory(device: torch.device) -> None:
    """Release what a failed pass left behind: its tensors now, and CUDA's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
