"""Test hooks for the fault suite: a poison job and a simulated CUDA out-of-memory error.

Both are off unless the settings turn them on, and both act only inside the worker, at the point
in the sampling loop where the real failures they stand for happen (after the first step, with
the pass's tensors alive), so the recovery code runs exactly as it would on a GPU:

- `Settings.fault_injection` (`SDFARM_FAULT_INJECTION=1`): a prompt that contains `POISON_MARKER`
  makes every pass it is part of fail, as a job that breaks the sampler deterministically would.
- `Settings.simulate_oom_above_batch` (`SDFARM_SIMULATE_OOM_ABOVE_BATCH=N`, 0 = off): a pass of
  more than N rows raises `torch.cuda.OutOfMemoryError`, as a GPU too small for the batch would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shared.config import Settings
from shared.errors import RenderFailed

__all__ = ["POISON_MARKER", "step_hook"]

# Put this in a prompt to make its job fail on a farm whose settings have `fault_injection` on.
POISON_MARKER = "[sdfarm-fault-injection:poison]"


def step_hook(settings: Settings, prompts: Sequence[str]) -> Callable[[int], None] | None:
    """A per-step check that raises the injected failure, or None when no hook applies."""
    poisoned = settings.fault_injection and any(POISON_MARKER in p for p in prompts)
    oom_limit = settings.simulate_oom_above_batch
    too_big = oom_limit > 0 and len(prompts) > oom_limit
    if not poisoned and not too_big:
        return None

    def check(step: int) -> None:  # raises at the first step, once the pass's tensors exist
        if poisoned:
            raise RenderFailed(
                f"fault injection: a prompt of this pass holds the poison marker {POISON_MARKER}"
            )
        raise torch.cuda.OutOfMemoryError(
            f"simulated CUDA out of memory: a pass of {len(prompts)} rows is more than "
            f"simulate_oom_above_batch={oom_limit} (test hook)"
        )

    return check
