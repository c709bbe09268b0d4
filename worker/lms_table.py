"""LMS's coefficients worked out once per noise schedule, not integrated again at every step.

diffusers' `LMSDiscreteScheduler.step` integrates its linear-multistep coefficients with
`scipy.integrate.quad` at every step, on the host; the integrand indexes `self.sigmas`, which sit
on the GPU, so each of its evaluations also waits for the device. The coefficients depend only on
the sigmas (the model's schedule and the step count), so the `lms_precompute` lever
(worker/levers.py) computes the whole table once, right after `set_timesteps`, with the
scheduler's own method on its own sigmas, and each step looks its coefficients up. The same
function on the same inputs: the images are bit for bit those of the per-step integration
(tests/test_lms_table.py). Tables are kept per schedule, so a warm worker computes each one once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from diffusers import LMSDiscreteScheduler

__all__ = ["LMS_ORDER", "install_lms_table"]

LMS_ORDER = 4  # `LMSDiscreteScheduler.step`'s default order, which the sampler uses
MAX_TABLES = 32  # schedules kept (one per model config and step count); each is a few KB

Table = dict[tuple[int, int, int], float]

_tables: OrderedDict[bytes, Table] = OrderedDict()
_lock = threading.Lock()


def install_lms_table(scheduler: LMSDiscreteScheduler) -> None:
    """Make `scheduler` precompute its coefficients whenever its timesteps are set."""
    set_timesteps = scheduler.set_timesteps
    integrate = scheduler.get_lms_coefficient

    def set_and_tabulate(*args: Any, **kwargs: Any) -> None:
        set_timesteps(*args, **kwargs)
        table = _table_for(scheduler, integrate)

        def lookup(order: int, t: int, current_order: int) -> float:
            found = table.get((order, t, current_order))
            return integrate(order, t, current_order) if found is None else found

        scheduler.get_lms_coefficient = lookup  # type: ignore[method-assign]

    scheduler.set_timesteps = set_and_tabulate  # type: ignore[method-assign]


def _table_for(scheduler: LMSDiscreteScheduler, integrate: Any) -> Table:
    key = scheduler.sigmas.detach().cpu().numpy().tobytes()
    with _lock:
        table = _tables.get(key)
        if table is not None:
            _tables.move_to_end(key)
            return table
    steps = len(scheduler.timesteps)
    table = {}
    for t in range(steps):
        order = min(t + 1, LMS_ORDER)  # as `step` chooses it at step index t
        for current in range(order):
            table[(order, t, current)] = float(integrate(order, t, current))
    with _lock:
        _tables[key] = table
        while len(_tables) > MAX_TABLES:
            _tables.popitem(last=False)
    return table
