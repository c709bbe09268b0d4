"""The samplers a job may ask for, one row each: everything else about them is derived from here.

The job spec's allowed `scheduler` values (`shared.jobs.SCHEDULERS`), A1111's label written into
the PNG (`shared.metadata.SAMPLER_LABELS`), the help text of the API and the CLI, and the
diffusers scheduler the worker builds (worker/schedulers.py, which turns the class name into the
class) all come from `SAMPLERS`. The worker configures each scheduler from the model's own
scheduler config first; `options` are what the name sets on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["SAMPLERS", "SAMPLER_IDS", "Sampler", "sampler_help"]


@dataclass(frozen=True)
class Sampler:
    """One sampler a job may name."""

    id: str  # what a job's `scheduler` field holds
    label: str  # A1111's name, so tools that read the PNG's `parameters` recognise it
    scheduler_class: str  # a diffusers scheduler class, by name (shared/ imports no diffusers)
    help: str  # one line for the API's schema and the CLI's --help
    options: dict[str, Any] = field(default_factory=dict)  # set on top of the model's config


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("lms", "LMS", "LMSDiscreteScheduler", "linear multistep"),
    Sampler("euler", "Euler", "EulerDiscreteScheduler", "Euler"),
    Sampler(
        "euler_a",
        "Euler a",
        "EulerAncestralDiscreteScheduler",
        "Euler ancestral: adds fresh noise at every step",
    ),
    Sampler("heun", "Heun", "HeunDiscreteScheduler", "Heun: two U-Net passes a step"),
    Sampler("ddim", "DDIM", "DDIMScheduler", "DDIM"),
    # SD's own shipped PNDM config skips the Runge-Kutta warm-up, as A1111's PLMS does.
    Sampler("pndm", "PLMS", "PNDMScheduler", "pseudo linear multistep", {"skip_prk_steps": True}),
    Sampler("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", "DPM-Solver++ 2M", _DPMPP_2M),
    Sampler(
        "dpmpp_2m_karras",
        "DPM++ 2M Karras",
        "DPMSolverMultistepScheduler",
        "DPM-Solver++ 2M with Karras sigmas",
        {**_DPMPP_2M, "use_karras_sigmas": True},
    ),
    Sampler("unipc", "UniPC", "UniPCMultistepScheduler", "UniPC"),
    Sampler(
        "dpmpp_sde",
        "DPM++ SDE",
        "DPMSolverSDEScheduler",
        "DPM-Solver++ SDE: adds fresh noise at every step",
    ),
)

SAMPLER_IDS: tuple[str, ...] = tuple(s.id for s in SAMPLERS)


def sampler_help() -> str:
    """Every sampler with its help line, for a field description or a --help."""
    return "; ".join(f"{s.id} ({s.help})" for s in SAMPLERS)
