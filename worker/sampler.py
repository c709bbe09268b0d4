"""The sampling loop: one batched pass over rows that share a model, a size, steps and a sampler.

Written out in numbered steps, as diffusers' pipeline_stable_diffusion.py is, and kept step for
step equal to it and to pipeline_stable_diffusion_img2img.py (tests/test_parity.py and
tests/test_samplers.py hold it to their pixels), with what a render farm needs on top: every row
has its own prompt, negative prompt, seed and guidance scale; progress is reported after every
U-Net step through `on_step`, which may raise to cancel the pass; and every random number a row
uses (its starting noise, its img2img latent sample, a stochastic sampler's noise) is drawn in
float32 on the CPU from the row's own seed, so a seed means the same image on every worker and
in every batch.

    1. encode prompts and negative prompts with the CLIP text encoder(s) (worker/prompts.py);
       SDXL adds each row's pooled embedding and size conditioning for the U-Net
    2. set the scheduler's timesteps (the tail of them for img2img)
    3. prepare latents: each row's noise from its own seed, or its init image noised to the
       starting timestep
    4. denoise: U-Net on [uncond, cond], classifier-free guidance, scheduler step; with an SDXL
       refiner, the base stops at the switch point and the refiner denoises the rest of the
       schedule from the base's latents, as diffusers' two-pipeline ensemble does
       (`denoising_end` / `denoising_start`), with its own text states and aesthetic scores
    5. decode latents with the VAE (the refiner's, when there is one) into 8-bit RGB pixels, with
       the precision guard (worker/vae.py)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from worker.conditioning import added_conditioning
from worker.models import LoadedModel
from worker.pass_checks import NATIVE_PIXELS_RANGE, check_pass, pass_warnings
from worker.pass_spec import PassParams, PassResult, Row
from worker.prompts import EncodedRow, encode_rows
from worker.schedulers import (
    base_timesteps,
    img2img_timesteps,
    make_scheduler,
    refiner_timesteps,
    step_kwargs,
)
from worker.vae import decode_latents, encode_images

__all__ = ["NATIVE_PIXELS_RANGE", "PassParams", "PassResult", "Row", "render_pass"]

log = logging.getLogger(__name__)


@contextmanager
def _timed(timings: dict[str, float], key: str, device: torch.device) -> Iterator[None]:
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        # CUDA runs asynchronously: without a sync the time would be that of queueing the work.
        torch.cuda.synchronize(device)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - started


def _noise(generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """One (1, C, h, w) float32 draw per row from its CPU generator, as randn_tensor does.

    Always float32, and cast only later: torch's CPU sampler does not give the same numbers in
    float16 as in float32 on every machine (seen on an H200 host with torch 2.11).
    """
    return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])


def _denoise(
    model: LoadedModel,
    rows: Sequence[Row],
    encoded: Sequence[EncodedRow],
    params: PassParams,
    on_step: Callable[[], None],
    *,
    refiner: tuple[LoadedModel, Sequence[EncodedRow]] | None = None,
) -> torch.Tensor:
    """Steps 2-4 for rows whose CLIP states have the same length; returns float32 latents.

    `refiner`: the refiner and the rows' states from its encoder; it finishes from the switch.
    """
    device = model.device
    generators = [torch.Generator().manual_seed(row.seed) for row in rows]
    seeds = [row.seed for row in rows]
    shape = (
        len(rows),
        model.unet.config.in_channels,
        params.height // model.vae_scale_factor,
        params.width // model.vae_scale_factor,
    )

    # 2. Set timesteps. LMS's init_noise_sigma depends on them, so this comes before the noise.
    scheduler = make_scheduler(params.scheduler, model.scheduler_config)
    scheduler.set_timesteps(params.steps, device=device)
    timesteps = scheduler.timesteps

    # 3. Prepare latents, in float32 whatever the model's dtype (the scheduler steps in float32).
    if params.strength is None:
        latents = _noise(generators, shape).to(device) * scheduler.init_noise_sigma
    else:
        timesteps = img2img_timesteps(scheduler, params.steps, params.strength)
        images = [row.init_image for row in rows if row.init_image is not None]
        # The VAE sample draws from each generator first, the noise after, as in diffusers.
        init_latents = encode_images(model, images, generators)
        noise = _noise(generators, shape).to(device)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(len(rows)))
    if params.refiner_switch_at is not None:
        timesteps = base_timesteps(scheduler, timesteps, params.refiner_switch_at)
    extra = step_kwargs(scheduler, generators, seeds, shape, device)

    # 4. Denoise, then let the refiner finish: the same rows, generators and latents, the
    # refiner's own scheduler (its timesteps from the switch point on) and conditioning.
    base = _Stage(model, scheduler, timesteps, encoded, extra)
    latents = _steps(base, latents, rows, params, on_step)
    if refiner is None or params.refiner_switch_at is None:
        return latents
    finisher, finisher_encoded = refiner
    scheduler = make_scheduler(params.scheduler, finisher.scheduler_config)
    scheduler.set_timesteps(params.steps, device=device)
    timesteps = refiner_timesteps(scheduler, params.refiner_switch_at)
    extra = step_kwargs(scheduler, generators, seeds, shape, device)
    finish = _Stage(finisher, scheduler, timesteps, finisher_encoded, extra)
    return _steps(finish, latents, rows, params, on_step)


@dataclass(frozen=True)
class _Stage:
    """One model's share of step 4: its scheduler and timesteps, the rows' states from its
    encoder(s), and what its scheduler's step needs besides tensors."""

    model: LoadedModel
    scheduler: Any  # a diffusers scheduler, set to its timesteps
    timesteps: torch.Tensor
    encoded: Sequence[EncodedRow]
    extra: dict[str, Any]


def _steps(
    stage: _Stage,
    latents: torch.Tensor,
    rows: Sequence[Row],
    params: PassParams,
    on_step: Callable[[], None],
) -> torch.Tensor:
    """Step 4 on one model: U-Net on [uncond, cond], guidance, scheduler step, per timestep.

    The scheduler turns the U-Net's output into the next latents whatever the model predicts
    (epsilon or v), so nothing here assumes a prediction type.
    """
    model, scheduler, encoded, extra = stage.model, stage.scheduler, stage.encoded, stage.extra
    device = model.device
    # Unconditional (negative) rows first, as the U-Net batch is laid out.
    prompt_embeds = torch.cat([e.uncond for e in encoded] + [e.cond for e in encoded])
    added_cond = added_conditioning(model, rows, encoded, params)
    guidance = torch.tensor([row.guidance for row in rows], device=device).view(-1, 1, 1, 1)
    for t in stage.timesteps:
        latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = model.unet(
            latent_model_input.to(model.dtype),
            t,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs=added_cond,
            return_dict=False,
        )[0].float()
        noise_uncond, noise_cond = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        on_step()
    result: torch.Tensor = latents
    return result


def render_pass(
    model: LoadedModel,
    rows: Sequence[Row],
    params: PassParams,
    on_step: Callable[[int, int], None] | None = None,
    *,
    refiner: LoadedModel | None = None,
) -> PassResult:
    """Render one image per row in a single batched pass; `on_step(done, total)` after each step.

    With `refiner` (an SDXL refiner; `params.refiner_switch_at` set), `model` denoises up to the
    switch point and the refiner finishes. An exception raised by `on_step` (RenderCancelled,
    say) stops the pass and propagates. A row whose image cannot be decoded has None for an
    image and the reason in `errors`.
    """
    check_pass(model, rows, params, refiner)
    timings: dict[str, float] = {}
    texts = [
        (r.prompt, r.negative_prompt, r.long_prompt, r.prompt_syntax, r.clip_skip) for r in rows
    ]
    with torch.inference_mode():
        # 1. Encode prompts (and again with the refiner's encoder, when there is one).
        with _timed(timings, "text_encoder", model.device):
            encoded = encode_rows(model, texts)
            refined = encode_rows(refiner, texts) if refiner is not None else None

        # Rows whose prompts were encoded in more chunks have longer CLIP states and cannot share
        # a U-Net batch with the others: each length gets its own loop.
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(encoded):
            groups.setdefault(e.cond.shape[1], []).append(i)
        latents: list[torch.Tensor | None] = [None] * len(rows)
        done = 0
        total = _evaluations(model, params, refiner) * len(groups)

        def step() -> None:
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(done, total)

        with _timed(timings, "unet", model.device):
            for members in groups.values():
                finish = None
                if refiner is not None and refined is not None:
                    finish = (refiner, [refined[i] for i in members])
                out = _denoise(
                    model,
                    [rows[i] for i in members],
                    [encoded[i] for i in members],
                    params,
                    step,
                    refiner=finish,
                )
                for i, row_latents in zip(members, out, strict=True):
                    latents[i] = row_latents

        # 5. Decode, then map [-1, 1] to 8-bit as diffusers' postprocess and numpy_to_pil do.
        with _timed(timings, "vae", model.device):
            decoder = refiner or model  # diffusers' refiner pipeline decodes with its own VAE
            decoded = decode_latents(decoder, torch.stack([x for x in latents if x is not None]))
    notes = pass_warnings(model, rows, params)
    warnings = [
        e.warnings + note + w for e, note, w in zip(encoded, notes, decoded.warnings, strict=True)
    ]
    log.debug(
        "pass of %d rows at %dx%d, %d steps of %s: %s",
        len(rows),
        params.width,
        params.height,
        params.steps,
        params.scheduler,
        ", ".join(f"{key} {seconds:.2f} s" for key, seconds in timings.items()),
    )
    return PassResult(
        images=decoded.images, timings=timings, warnings=warnings, errors=decoded.errors
    )


def _evaluations(model: LoadedModel, params: PassParams, refiner: LoadedModel | None) -> int:
    """How many U-Net steps one loop takes (2 * steps - 1 for Heun, steps + 1 for PLMS, ...),
    the base's and the refiner's together."""
    scheduler = make_scheduler(params.scheduler, model.scheduler_config)
    scheduler.set_timesteps(params.steps)
    timesteps = scheduler.timesteps
    if params.strength is not None:
        timesteps = img2img_timesteps(scheduler, params.steps, params.strength)
    if params.refiner_switch_at is None or refiner is None:
        return len(timesteps)
    count = len(base_timesteps(scheduler, timesteps, params.refiner_switch_at))
    scheduler = make_scheduler(params.scheduler, refiner.scheduler_config)
    scheduler.set_timesteps(params.steps)
    return count + len(refiner_timesteps(scheduler, params.refiner_switch_at))
