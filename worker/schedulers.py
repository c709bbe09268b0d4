"""Samplers by name: each builds a fresh diffusers scheduler from the model's own scheduler config.

A scheduler keeps state while it samples (LMS keeps its past derivatives), so every pass gets a
new one. Its noise schedule and prediction type come from the model's scheduler_config.json,
never from constants here, so SD 1.x (epsilon) and SD 2.x (v-prediction) models both sample right.
What a name adds on top (Karras sigmas, the DPM-Solver++ variant) is in its row of the sampler
table (shared/samplers.py, with its class), and the model's own choices of that kind are dropped
first: `euler` is A1111's Euler whatever class the model folder was saved with.

Stochastic samplers draw their noise from each row's own CPU generator (euler_a) or from one
Brownian tree per row seeded with the row's seed (dpmpp_sde, as A1111 does), always in float32 on
the CPU: a job's image depends neither on its batch-mates nor on the worker's device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import diffusers
import torch
from diffusers import DPMSolverSDEScheduler, LMSDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from shared.samplers import SAMPLERS
from worker.lms_table import install_lms_table

__all__ = [
    "SCHEDULERS",
    "base_timesteps",
    "img2img_timesteps",
    "make_scheduler",
    "refiner_timesteps",
    "set_host_precompute",
    "step_kwargs",
]

SchedulerFactory = Callable[[Mapping[str, Any]], SchedulerMixin]

# Keys of a saved scheduler config that choose a sampler variant rather than describe the model's
# noise schedule; the sampler name decides these.
VARIANT_KEYS = frozenset(
    {
        "algorithm_type",
        "euler_at_final",
        "final_sigmas_type",
        "lower_order_final",
        "predict_x0",
        "skip_prk_steps",
        "solver_order",
        "solver_type",
        "use_beta_sigmas",
        "use_exponential_sigmas",
        "use_karras_sigmas",
        "use_lu_lambdas",
    }
)


def _from(cls: type[SchedulerMixin], **variant: Any) -> SchedulerFactory:
    def build(config: Mapping[str, Any]) -> SchedulerMixin:
        schedule = {k: v for k, v in config.items() if k not in VARIANT_KEYS}
        scheduler: SchedulerMixin = cls.from_config(schedule, **variant)
        return scheduler

    return build


# Each sampler of the table (shared/samplers.py) -> a factory of its diffusers scheduler class.
SCHEDULERS: dict[str, SchedulerFactory] = {
    s.id: _from(getattr(diffusers, s.scheduler_class), **s.options) for s in SAMPLERS
}


# The `lms_precompute` lever (worker/levers.py sets it for the process, as it sets cuDNN's flags):
# LMS's coefficients tabulated once per schedule (worker/lms_table.py) instead of every step.
_host_precompute = {"lms": False}


def set_host_precompute(enabled: bool) -> None:
    """Turn the `lms_precompute` lever on or off for every scheduler made from now on."""
    _host_precompute["lms"] = enabled


def make_scheduler(name: str, scheduler_config: Mapping[str, Any]) -> SchedulerMixin:
    """A new scheduler called `name`, configured from the model's `scheduler_config`."""
    factory = SCHEDULERS.get(name)
    if factory is None:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    scheduler = factory(scheduler_config)
    if _host_precompute["lms"] and isinstance(scheduler, LMSDiscreteScheduler):
        install_lms_table(scheduler)
    return scheduler


def step_kwargs(
    scheduler: SchedulerMixin,
    generators: Sequence[torch.Generator],
    seeds: Sequence[int],
    shape: tuple[int, ...],
    device: torch.device,
) -> dict[str, Any]:
    """What `scheduler.step` needs besides its tensors, so that each row draws its own noise.

    Call after `set_timesteps`. Rows are given in batch order; `shape` is the latents' shape.
    """
    if isinstance(scheduler, DPMSolverSDEScheduler):
        _install_brownian_noise(scheduler, seeds, shape, device)
    if "generator" in inspect.signature(scheduler.step).parameters:
        # diffusers' randn_tensor draws one (1, ...) tensor per generator of a list, on the
        # generators' device (the CPU) and in the model output's dtype: float32 in our loop.
        return {"generator": list(generators)}
    return {}


def _install_brownian_noise(
    scheduler: DPMSolverSDEScheduler,
    seeds: Sequence[int],
    shape: tuple[int, ...],
    device: torch.device,
) -> None:
    """One Brownian tree per row, seeded with the row's seed, on the CPU in float32.

    The scheduler would build its sampler at the first step on the latents' device, from a seed
    in its config shared by all rows; this builds the same sampler (same sigma range) per row.
    """
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    sigmas = scheduler.sigmas.cpu()
    sampler = BrownianTreeNoiseSampler(
        torch.zeros(shape, dtype=torch.float32),
        sigmas[sigmas > 0].min().item(),
        sigmas.max().item(),
        list(seeds),
    )

    # torchsde rounds the tree's ends (to its tolerance) and clamps queries outside them with a
    # warning at every step; the step's exp(-(-log(sigma))) lands just outside at the lowest
    # sigma. So the tree is queried with the clamped times torchsde would use, and the scaling
    # is BrownianTreeNoiseSampler's own, on the unclamped float32 sigmas, as diffusers computes.
    batched = sampler.tree
    start, end = float(batched.trees[0]._start), float(batched.trees[0]._end)

    def noise(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = sigma.cpu(), sigma_next.cpu()
        a, b = (min(max(float(t), start), end) for t in (t0, t1))
        drawn: torch.Tensor = batched(a, b) / (t1 - t0).abs().sqrt()
        return drawn.to(device)

    scheduler.noise_sampler = noise


def img2img_timesteps(scheduler: SchedulerMixin, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule that img2img denoises, as diffusers' img2img pipeline takes it.

    `steps * strength` steps are run (at least one: the job spec refuses less), starting from
    the timestep the init image is noised to; multistep schedulers are told where they begin.
    """
    init_steps = min(int(steps * strength), steps)
    start = max(steps - init_steps, 0) * scheduler.order
    timesteps: torch.Tensor = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return timesteps


def _cutoff(scheduler: SchedulerMixin, switch_at: float) -> int:
    """The training timestep at which a base hands over to its refiner (`switch_at` of the way
    through the noise schedule), as diffusers' SDXL pipelines round it."""
    train = int(scheduler.config.num_train_timesteps)
    return round(train - switch_at * train)


def base_timesteps(
    scheduler: SchedulerMixin, timesteps: torch.Tensor, switch_at: float
) -> torch.Tensor:
    """The base's share of `timesteps` before a refiner takes over: those at or above the
    cutoff (diffusers' `denoising_end`)."""
    cutoff = _cutoff(scheduler, switch_at)
    count = int((timesteps >= cutoff).sum().item())
    return timesteps[:count]


def refiner_timesteps(scheduler: SchedulerMixin, switch_at: float) -> torch.Tensor:
    """The refiner's share of the full schedule (after `set_timesteps`): those below the cutoff
    (diffusers' `denoising_start`); a second-order scheduler never starts between its two
    evaluations of a step. Multistep schedulers are told where they begin."""
    cutoff = _cutoff(scheduler, switch_at)
    count = int((scheduler.timesteps < cutoff).sum().item())
    if scheduler.order == 2 and count % 2 == 0:
        count += 1
    start = len(scheduler.timesteps) - count
    timesteps: torch.Tensor = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return timesteps
