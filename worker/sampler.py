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
    4. denoise: U-Net on [uncond, cond], classifier-free guidance, scheduler step
    5. decode latents with the VAE into 8-bit RGB pixels, with the precision guard (worker/vae.py)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.errors import InvalidJob
from worker.models import LoadedModel
from worker.prompts import EncodedRow, encode_rows
from worker.schedulers import img2img_timesteps, make_scheduler, step_kwargs
from worker.vae import decode_latents, encode_images

__all__ = ["NATIVE_PIXELS_RANGE", "PassParams", "PassResult", "Row", "render_pass"]

# A size whose pixel count is within this many times the model's native square gets no warning:
# SD 1.5 at 512x768 or 768x768, SDXL at 832x1216 are common; SDXL at 512x512 is not.
NATIVE_PIXELS_RANGE = (0.5, 4.0)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One job in a batched pass."""

    prompt: str
    negative_prompt: str
    seed: int
    guidance: float  # classifier-free guidance scale (A1111's "CFG scale")
    init_image: np.ndarray | None = None  # img2img: H x W x 3 uint8 at the pass's size
    long_prompt: str = "truncate"  # or "chunk": see worker/prompts.py
    # SDXL's size conditioning, (height, width) and (top, left) as diffusers orders them; the
    # original size is the pass's size when None.
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class PassParams:
    """What all rows of a pass share."""

    steps: int
    width: int
    height: int
    scheduler: str = "lms"
    strength: float | None = None  # img2img when set: every row then has an init image


@dataclass
class PassResult:
    """The images of a pass, in row order, what each row should know, and where time went."""

    images: list[np.ndarray | None]  # H x W x 3 uint8, None where the row failed
    timings: dict[str, float]  # seconds: "text_encoder", "unet" (the whole loop), "vae"
    warnings: list[list[str]] = field(default_factory=list)  # per row, for the job record
    errors: list[str | None] = field(default_factory=list)  # per row: why it has no image


def _check(model: LoadedModel, rows: Sequence[Row], params: PassParams) -> None:
    if not rows:
        raise ValueError("render_pass needs at least one row, got none")
    if params.steps < 1:
        raise InvalidJob(f"`steps` has to be at least 1 but is {params.steps}")
    factor = model.vae_scale_factor
    for name, value in (("width", params.width), ("height", params.height)):
        if value <= 0:
            raise InvalidJob(f"`{name}` has to be positive but is {value}")
        if value % factor:
            raise InvalidJob(f"`{name}` has to be divisible by {factor} but is {value}")
    if params.strength is None:
        return
    if not 0 < params.strength <= 1 or int(params.steps * params.strength) < 1:
        raise InvalidJob(
            f"`strength` has to be in (0, 1] with strength x steps >= 1 but is "
            f"{params.strength} with {params.steps} steps"
        )
    wanted = (params.height, params.width, 3)
    for i, row in enumerate(rows):
        if row.init_image is None or row.init_image.shape != wanted:
            shape = None if row.init_image is None else row.init_image.shape
            raise InvalidJob(f"row {i}: `init_image` has to be {wanted} uint8 but is {shape}")


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
) -> torch.Tensor:
    """Steps 2-4 for rows whose CLIP states have the same length; returns float32 latents."""
    device = model.device
    generators = [torch.Generator().manual_seed(row.seed) for row in rows]
    shape = (
        len(rows),
        model.unet.config.in_channels,
        params.height // model.vae_scale_factor,
        params.width // model.vae_scale_factor,
    )
    # Unconditional (negative) rows first, as the U-Net batch is laid out.
    prompt_embeds = torch.cat([e.uncond for e in encoded] + [e.cond for e in encoded])
    added_cond = _added_conditioning(model, rows, encoded, params)

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
    extra = step_kwargs(scheduler, generators, [row.seed for row in rows], shape, device)

    # 4. Denoise. The scheduler turns the U-Net's output into the next latents whatever the
    # model predicts (epsilon or v), so nothing here assumes a prediction type.
    guidance = torch.tensor([row.guidance for row in rows], device=device).view(-1, 1, 1, 1)
    for t in timesteps:
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


def _added_conditioning(
    model: LoadedModel, rows: Sequence[Row], encoded: Sequence[EncodedRow], params: PassParams
) -> dict[str, torch.Tensor] | None:
    """SDXL's `text_time` conditioning, laid out as the U-Net batch ([uncond rows, cond rows]):
    each row's pooled embedding, and its six size numbers (original size, crop top-left, target
    size), the negative half with the same numbers as its row, as diffusers does by default."""
    if model.family != "sdxl":
        return None
    pooled = [e.pooled_uncond for e in encoded] + [e.pooled_cond for e in encoded]
    text_embeds = torch.cat([p for p in pooled if p is not None])
    target = (params.height, params.width)
    numbers = [[*(row.original_size or target), *row.crop_top_left, *target] for row in rows]
    time_ids = torch.tensor(numbers * 2, dtype=text_embeds.dtype)
    return {"text_embeds": text_embeds, "time_ids": time_ids.to(model.device)}


def render_pass(
    model: LoadedModel,
    rows: Sequence[Row],
    params: PassParams,
    on_step: Callable[[int, int], None] | None = None,
) -> PassResult:
    """Render one image per row in a single batched pass; `on_step(done, total)` after each step.

    An exception raised by `on_step` (RenderCancelled, say) stops the pass and propagates. A row
    whose image cannot be decoded has None for an image and the reason in `errors`.
    """
    _check(model, rows, params)
    timings: dict[str, float] = {}
    with torch.inference_mode():
        # 1. Encode prompts.
        with _timed(timings, "text_encoder", model.device):
            encoded = encode_rows(
                model, [(r.prompt, r.negative_prompt, r.long_prompt) for r in rows]
            )

        # Rows whose prompts were encoded in more chunks have longer CLIP states and cannot share
        # a U-Net batch with the others: each length gets its own loop.
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(encoded):
            groups.setdefault(e.cond.shape[1], []).append(i)
        latents: list[torch.Tensor | None] = [None] * len(rows)
        done = 0
        total = _evaluations(model, params) * len(groups)

        def step() -> None:
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(done, total)

        with _timed(timings, "unet", model.device):
            for members in groups.values():
                out = _denoise(
                    model, [rows[i] for i in members], [encoded[i] for i in members], params, step
                )
                for i, row_latents in zip(members, out, strict=True):
                    latents[i] = row_latents

        # 5. Decode, then map [-1, 1] to 8-bit as diffusers' postprocess and numpy_to_pil do.
        with _timed(timings, "vae", model.device):
            decoded = decode_latents(model, torch.stack([x for x in latents if x is not None]))
    size_note = _far_from_native(model, params)
    warnings = [
        e.warnings + _ignored_conditioning(model, row) + size_note + w
        for row, e, w in zip(rows, encoded, decoded.warnings, strict=True)
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


def _far_from_native(model: LoadedModel, params: PassParams) -> list[str]:
    """A warning when the size is far from the model's own (rendered as asked, never changed)."""
    ratio = params.width * params.height / model.native_px**2
    if NATIVE_PIXELS_RANGE[0] <= ratio <= NATIVE_PIXELS_RANGE[1]:
        return []
    return [
        f"{params.width}x{params.height} is far from the {model.native_px}x{model.native_px} "
        f"this {model.family} model was trained at; expect broken or repeated composition"
    ]


def _ignored_conditioning(model: LoadedModel, row: Row) -> list[str]:
    if model.family == "sdxl" or (row.original_size is None and row.crop_top_left == (0, 0)):
        return []
    return [f"original size and crop are SDXL conditioning; this {model.family} model ignores them"]


def _evaluations(model: LoadedModel, params: PassParams) -> int:
    """How many U-Net steps one loop takes (2 * steps - 1 for Heun, steps + 1 for PLMS, ...)."""
    scheduler = make_scheduler(params.scheduler, model.scheduler_config)
    scheduler.set_timesteps(params.steps)
    if params.strength is None:
        return len(scheduler.timesteps)
    return len(img2img_timesteps(scheduler, params.steps, params.strength))
