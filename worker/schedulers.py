"""Samplers by name: each builds a fresh diffusers scheduler from the model's own scheduler config.

A scheduler keeps state while it samples (LMS keeps its past derivatives), so every pass gets a
new one. Its noise schedule and prediction type come from the model's scheduler_config.json,
never from constants here, so SD 1.x (epsilon) and SD 2.x (v-prediction) models both sample right.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from diffusers import LMSDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from shared.metadata import SAMPLER_LABELS

__all__ = ["SAMPLER_LABELS", "SCHEDULERS", "make_scheduler"]

SchedulerFactory = Callable[[Mapping[str, Any]], SchedulerMixin]

# sdfarm name -> factory. from_config keeps the model's noise schedule (betas, steps_offset,
# prediction_type, ...) whatever scheduler class the model folder was saved with.
SCHEDULERS: dict[str, SchedulerFactory] = {
    "lms": lambda config: LMSDiscreteScheduler.from_config(dict(config)),
}



def make_scheduler(name: str, scheduler_config: Mapping[str, Any]) -> SchedulerMixin:
    """A new scheduler called `name`, configured from the model's `scheduler_config`."""
    factory = SCHEDULERS.get(name)
    if factory is None:
        raise ValueError(f"scheduler must be one of {', '.join(sorted(SCHEDULERS))}, got {name!r}")
    return factory(scheduler_config)
