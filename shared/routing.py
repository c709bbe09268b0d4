"""Which jobs may share a GPU pass (the compatibility key), and where their chunks go (the route).

Jobs share a pass when their compatibility key matches: model (and refiner with its switch
point), size, steps, sampler and img2img strength. Everything else (prompts, seeds, guidance, size
conditioning, aesthetic scores) is per row. A chunk goes to its route's queue: the model's, or
`base+refiner`'s, which only workers holding both models consume.
"""

from __future__ import annotations

from shared.jobs import JobSpec

__all__ = ["compat_key", "route_models", "route_of"]


def compat_key(spec: JobSpec) -> str:
    """Jobs with the same key can share one batched pass on the GPU."""
    key = f"{spec.model}|{spec.width}x{spec.height}|{spec.steps}|{spec.scheduler}"
    if spec.init_image is not None:
        # The strength sets where sampling starts, so only equal strengths share a pass.
        key += f"|img2img@{spec.denoising_strength:g}"
    if spec.refiner is not None:
        key += f"|refiner={spec.refiner}@{spec.switch_at:g}"
    if spec.loras:
        # A LoRA changes the U-Net's weights: only the same set at the same weights shares.
        loras = sorted(f"{lora.name}:{lora.weight:g}" for lora in spec.loras if lora.weight)
        key += f"|loras={','.join(loras)}" if loras else ""
    if spec.vae is not None:
        key += f"|vae={spec.vae}"
    return key


def route_of(spec: JobSpec) -> str:
    """Where a job's chunks go: its model's queue, or for a refined job `base+refiner`, served
    only by workers that hold both (model names hold no `+`: shared/config.py)."""
    if spec.refiner is None:
        return str(spec.model)
    return f"{spec.model}+{spec.refiner}"


def route_models(route: str) -> list[str]:
    """The models a worker must hold to serve `route`."""
    return route.split("+")
