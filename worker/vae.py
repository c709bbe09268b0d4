"""Pixels to latents and back with the model's VAE, and the precision guard around the decode.

Encoding is the seed walkthrough's `image_to_latent`: scale the image to [-1, 1], encode, sample
the latent distribution, multiply by the model's scaling factor. The sample's noise comes from the
row's own generator, in float32 on the CPU, as diffusers' img2img pipeline draws it.

Decoding in float16 can overflow (SD's VAE is known for it) and give NaN, which becomes a black
image. So a row whose decode is not finite, or is black everywhere, is decoded again with the VAE
in float32, and the row records that it was; a row that is still bad fails with the reason, and
no black image is ever stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from worker.models import LoadedModel

__all__ = ["Decoded", "decode_latents", "encode_images"]

log = logging.getLogger(__name__)

FP32_RETRY_WARNING = "vae decoded in fp32: the {dtype} decode gave {problem}"


def encode_images(
    model: LoadedModel, images: Sequence[np.ndarray], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Scaled float32 latents of H x W x 3 uint8 images, one row per image and generator."""
    vae = model.vae
    latents = []
    for image, generator in zip(images, generators, strict=True):
        # (1, H, W, 3) permuted to NCHW is channels-last in memory, as diffusers' image processor
        # hands it to the VAE; a contiguous copy would pick other convolution kernels and differ
        # by float rounding, which the sampling loop can amplify to visible levels.
        pixels = torch.tensor(image[None], dtype=torch.float32) / 255.0
        pixels = (2.0 * pixels - 1.0).permute(0, 3, 1, 2)
        dist = vae.encode(pixels.to(device=model.device, dtype=vae.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32)
        sample = dist.mean.float() + dist.std.float() * noise.to(model.device)
        latents.append(sample)
    return model.scaling_factor * torch.cat(latents)


@dataclass
class Decoded:
    """Per row: 8-bit pixels (None when the row failed), warnings, and the reason of a failure."""

    images: list[np.ndarray | None]
    warnings: list[list[str]]
    errors: list[str | None]


def _decode(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """[0, 1] float32 pixels, N x H x W x 3, unclamped NaNs kept so they can be seen."""
    vae = model.vae
    image: torch.Tensor = vae.decode(
        (latents / model.scaling_factor).to(vae.dtype), return_dict=False
    )[0]
    return (image.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def _problem(pixels: torch.Tensor) -> str | None:
    if not torch.isfinite(pixels).all():
        return "NaN"
    if (pixels * 255).round().max() == 0:
        return "an all-black image"
    return None


@contextmanager
def _vae_in_float32(model: LoadedModel) -> Iterator[None]:
    dtype = model.vae.dtype
    # nn.Module.to, not diffusers' override: that one logs a warning on every dtype cast.
    torch.nn.Module.to(model.vae, torch.float32)
    try:
        yield
    finally:
        torch.nn.Module.to(model.vae, dtype)


def decode_latents(model: LoadedModel, latents: torch.Tensor) -> Decoded:
    """Decode each row, retrying bad rows in float32 and failing rows that stay bad."""
    pixels = _decode(model, latents)
    rows = len(pixels)
    problems = [_problem(pixels[i]) for i in range(rows)]
    warnings: list[list[str]] = [[] for _ in range(rows)]
    bad = [i for i, problem in enumerate(problems) if problem]
    if bad and model.vae.dtype != torch.float32:
        dtype = str(model.vae.dtype).removeprefix("torch.")
        log.warning(
            "rows %s: %s VAE decode gave %s; decoding again in float32",
            bad,
            dtype,
            ", ".join(sorted({problems[i] or "" for i in bad})),
        )
        with _vae_in_float32(model):
            retried = _decode(model, latents[bad])
        for index, row in enumerate(bad):
            warnings[row].append(FP32_RETRY_WARNING.format(dtype=dtype, problem=problems[row]))
            pixels[row] = retried[index]
            problems[row] = _problem(retried[index])
    errors: list[str | None] = [None] * rows
    images: list[np.ndarray | None] = [None] * rows
    for i, problem in enumerate(problems):
        if problem is None:
            images[i] = (pixels[i].numpy() * 255).round().astype(np.uint8)
            continue
        finite = bool(torch.isfinite(latents[i]).all())
        cause = (
            "the VAE itself fails on these latents"
            if finite
            else "the U-Net's latents are not finite (try float32, or another sampler)"
        )
        errors[i] = f"the VAE decode gave {problem} even in float32: {cause}"
        log.error("row %d: %s", i, errors[i])
    return Decoded(images=images, warnings=warnings, errors=errors)
