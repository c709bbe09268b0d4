"""The sampling loop: one batched pass of text-to-image over rows that share a model and settings.

Written out in numbered steps, as diffusers' pipeline_stable_diffusion.py is, and kept step for
step equal to it (tests/test_parity.py holds it to the pipeline's pixels), with what a render
farm needs on top: every row has its own prompt, negative prompt, seed and guidance scale;
progress is reported after every step through `on_step`, which may raise to cancel the pass; and
the starting noise is always drawn in float32, so a seed means the same noise on every worker.

    1. encode prompts and negative prompts with the CLIP text encoder
    2. set the scheduler's timesteps
    3. draw each row's starting noise from its own seed
    4. denoise: U-Net on [uncond, cond], classifier-free guidance, scheduler step
    5. decode latents with the VAE into 8-bit RGB pixels
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from shared.errors import InvalidJob
from worker.models import LoadedModel
from worker.schedulers import make_scheduler

__all__ = ["PassParams", "PassResult", "Row", "render_pass"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One job in a batched pass."""

    prompt: str
    negative_prompt: str
    seed: int
    guidance: float  # classifier-free guidance scale (A1111's "CFG scale")


@dataclass(frozen=True)
class PassParams:
    """What all rows of a pass share."""

    steps: int
    width: int
    height: int
    scheduler: str = "lms"


@dataclass
class PassResult:
    """The images of a pass, in row order, and where its time went."""

    images: list[np.ndarray]  # H x W x 3, uint8, one per row
    timings: dict[str, float]  # seconds: "text_encoder", "unet" (the whole loop), "vae"


def _check(model: LoadedModel, rows: Sequence[Row], params: PassParams) -> None:
    if not rows:
        raise ValueError("render_pass needs at least one row, got none")
    if params.steps < 1:
        raise InvalidJob(f"`steps` has to be at least 1 but is {params.steps}")
    factor = model.vae_scale_factor
    for field, value in (("width", params.width), ("height", params.height)):
        if value <= 0:
            raise InvalidJob(f"`{field}` has to be positive but is {value}")
        if value % factor:
            raise InvalidJob(f"`{field}` has to be divisible by {factor} but is {value}")


@contextmanager
def _timed(timings: dict[str, float], key: str, device: torch.device) -> Iterator[None]:
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        # CUDA runs asynchronously: without a sync the time would be that of queueing the work.
        torch.cuda.synchronize(device)
    timings[key] = time.perf_counter() - started


def _encode(model: LoadedModel, texts: list[str]) -> torch.Tensor:
    """CLIP's last hidden state for each text, padded or cut to the tokenizer's 77 tokens."""
    tokenizer = model.tokenizer
    max_length = tokenizer.model_max_length
    for i, ids in enumerate(tokenizer(texts).input_ids):
        if len(ids) > max_length:
            logger.warning(
                "row %d: text is %d tokens, CLIP reads the first %d: %r",
                i,
                len(ids),
                max_length,
                texts[i][:60],
            )
    tokens = tokenizer(
        texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    # SD's U-Net was trained on CLIP states computed without an attention mask, padding included;
    # as in diffusers, only a text encoder whose config asks for a mask gets one.
    attention_mask = None
    if getattr(model.text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(model.device)
    output = model.text_encoder(tokens.input_ids.to(model.device), attention_mask=attention_mask)
    hidden: torch.Tensor = output[0].to(dtype=model.dtype)
    return hidden


def _initial_noise(model: LoadedModel, rows: Sequence[Row], params: PassParams) -> torch.Tensor:
    """Each row's noise from its own CPU generator: an image never depends on its batch-mates.

    One (1, C, h, w) draw per seed on the CPU, as diffusers' randn_tensor does with a list of CPU
    generators, but always in float32 and only then cast to the model's dtype (as A1111 does):
    torch's CPU sampler does not give the same numbers in float16 as in float32 on every machine
    (seen on an H200 host with torch 2.11), so drawing in the model's dtype would let a seed's
    noise depend on the worker's dtype, CPU and torch build.
    """
    shape = (
        1,
        model.unet.config.in_channels,
        params.height // model.vae_scale_factor,
        params.width // model.vae_scale_factor,
    )
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(row.seed)) for row in rows]
    return torch.cat(noise).to(device=model.device, dtype=model.dtype)


def render_pass(
    model: LoadedModel,
    rows: Sequence[Row],
    params: PassParams,
    on_step: Callable[[int, int], None] | None = None,
) -> PassResult:
    """Render one image per row in a single batched pass; `on_step(done, total)` after each step.

    An exception raised by `on_step` (RenderCancelled, say) stops the pass and propagates.
    """
    _check(model, rows, params)
    timings: dict[str, float] = {}
    with torch.inference_mode():
        # 1. Encode prompts. Unconditional (negative) rows first, as the U-Net batch is laid out.
        with _timed(timings, "text_encoder", model.device):
            cond = _encode(model, [row.prompt for row in rows])
            uncond = _encode(model, [row.negative_prompt for row in rows])
            prompt_embeds = torch.cat([uncond, cond])

        # 2. Set timesteps. LMS's init_noise_sigma depends on them, so this comes before the noise.
        scheduler = make_scheduler(params.scheduler, model.scheduler_config)
        scheduler.set_timesteps(params.steps, device=model.device)
        timesteps = scheduler.timesteps

        # 3. Prepare latents: per-row seeded noise, scaled to the scheduler's starting sigma.
        latents = _initial_noise(model, rows, params) * scheduler.init_noise_sigma

        # 4. Denoise. The scheduler turns the U-Net's output into the next latents whatever the
        # model predicts (epsilon or v), so nothing here assumes a prediction type.
        guidance = torch.tensor(
            [row.guidance for row in rows], dtype=model.dtype, device=model.device
        ).view(-1, 1, 1, 1)
        with _timed(timings, "unet", model.device):
            for i, t in enumerate(timesteps):
                latent_model_input = torch.cat([latents] * 2)
                latent_model_input = scheduler.scale_model_input(latent_model_input, t)
                noise_pred = model.unet(
                    latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False
                )[0]
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance * (noise_cond - noise_uncond)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if on_step is not None:
                    # Total is the number of U-Net evaluations, equal to `steps` for LMS.
                    on_step(i + 1, len(timesteps))

        # 5. Decode, then map [-1, 1] to 8-bit as diffusers' postprocess and numpy_to_pil do.
        with _timed(timings, "vae", model.device):
            image = model.vae.decode(latents / model.scaling_factor, return_dict=False)[0]
            image = (image * 0.5 + 0.5).clamp(0, 1)
            pixels = image.cpu().permute(0, 2, 3, 1).float().numpy()
    images = list((pixels * 255).round().astype(np.uint8))
    logger.debug(
        "pass of %d rows at %dx%d, %d steps: %s",
        len(rows),
        params.width,
        params.height,
        params.steps,
        ", ".join(f"{key} {seconds:.2f} s" for key, seconds in timings.items()),
    )
    return PassResult(images=images, timings=timings)
