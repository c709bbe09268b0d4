"""Generation parameters embedded in each image: A1111's `parameters` text and a JSON record
(a PNG's text chunks, or a WebP's or JPEG's EXIF: shared/image_formats.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from PIL import Image

from shared.image_formats import encode_image_bytes, read_image_metadata
from shared.jobs import DEFAULT_REFINER_SWITCH_AT, DEFAULT_STRENGTH
from shared.samplers import SAMPLERS

__all__ = ["SAMPLER_LABELS", "encode_image", "encode_png", "infotext", "read_png_metadata"]

# A1111's names for each sampler, so tools that read `parameters` recognise them.
SAMPLER_LABELS: dict[str, str] = {s.id: s.label for s in SAMPLERS}


def _number(value: float) -> str:
    """`7.5`, `1`: A1111's short form, unless it would lose digits (shared/infotext.py reads it)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def _prompt_line(spec: dict[str, Any]) -> str:
    """The prompt as A1111 writes it: its `<lora:NAME:W>` tags kept in the text (sdfarm moved
    them into `loras` at submit, so they go back at the end)."""
    tags = [f"<lora:{lora['name']}:{_number(lora['weight'])}>" for lora in spec.get("loras") or []]
    return " ".join([spec["prompt"], *tags])


def infotext(
    spec: dict[str, Any],
    *,
    model_name: str,
    model_hash: str | None = None,
    refiner_hash: str | None = None,
    extra: Sequence[tuple[str, str]] = (),
    vae_hash: str | None = None,
    rng: str | None = "CPU",
) -> str:
    """The A1111 `parameters` text: prompt (with its LoRA tags), `Negative prompt:` line when
    set, then settings in A1111's order, with `RNG: CPU` after the size (sdfarm draws every random
    number on the CPU, which A1111 does not assume: its default is the GPU's; `rng=None` leaves it
    out): `VAE hash`/`VAE` with a VAE override, `Clip skip` above 1, with a refiner A1111's
    `Refiner: name [hash]` and `Refiner switch at`, then `extra`."""
    lines = [_prompt_line(spec)]
    if spec.get("negative_prompt"):
        lines.append(f"Negative prompt: {spec['negative_prompt']}")
    settings = [
        f"Steps: {spec['steps']}",
        f"Sampler: {SAMPLER_LABELS.get(spec['scheduler'], spec['scheduler'])}",
        f"CFG scale: {_number(spec['guidance'])}",
        f"Seed: {spec['seed']}",
        f"Size: {spec['width']}x{spec['height']}",
    ]
    if rng:
        settings.append(f"RNG: {rng}")
    if model_hash:
        settings.append(f"Model hash: {model_hash}")
    settings.append(f"Model: {model_name}")
    if spec.get("vae"):
        settings += [f"VAE hash: {vae_hash}"] if vae_hash else []
        settings.append(f"VAE: {spec['vae']}")
    if spec.get("init_image"):
        strength = spec.get("strength")
        strength = DEFAULT_STRENGTH if strength is None else strength
        settings.append(f"Denoising strength: {strength:g}")
    if (spec.get("clip_skip") or 1) > 1:
        settings.append(f"Clip skip: {spec['clip_skip']}")
    # sdfarm's own keys, written only when they differ from the job defaults; A1111 ignores them.
    if spec.get("long_prompt") == "chunk":
        settings.append("Long prompt: chunk")
    if spec.get("prompt_syntax") == "plain":
        settings.append("Prompt syntax: plain")
    if spec.get("refiner"):
        hashed = f" [{refiner_hash}]" if refiner_hash else ""
        switch = spec.get("refiner_switch_at")
        switch = DEFAULT_REFINER_SWITCH_AT if switch is None else switch
        settings += [f"Refiner: {spec['refiner']}{hashed}", f"Refiner switch at: {_number(switch)}"]
    settings += [f"{key}: {value}" for key, value in extra]  # e.g. ("Lora hashes", '"a: 1f"')
    lines.append(", ".join(settings))
    return "\n".join(lines)


def encode_png(pixels: Image.Image, spec: dict[str, Any], **kwargs: Any) -> bytes:
    """`encode_image` as a PNG, whatever the spec's `output_format`."""
    return encode_image(pixels, spec, output_format="png", **kwargs)


def encode_image(
    pixels: Image.Image,
    spec: dict[str, Any],
    *,
    model_name: str,
    model_hash: str | None,
    output_format: str | None = None,
    extra: dict[str, Any] | None = None,
    refiner_hash: str | None = None,
    extra_params: Sequence[tuple[str, str]] = (),
    vae_hash: str | None = None,
    rng: str | None = "CPU",
) -> bytes:
    """The image in the spec's `output_format` (or `output_format`) and `quality`, with A1111's
    `parameters` and the JSON record embedded where that format keeps them
    (shared/image_formats.py): `extra` joins the JSON record, `extra_params` are more
    `Key: value` settings for `parameters` (`infotext`'s `extra`), the rest are `infotext`'s."""
    text = infotext(
        spec,
        model_name=model_name,
        model_hash=model_hash,
        refiner_hash=refiner_hash,
        extra=extra_params,
        vae_hash=vae_hash,
        rng=rng,
    )
    record = {"spec": _without_image_data(spec), "model_hash": model_hash, **(extra or {})}
    if refiner_hash is not None:
        record["refiner_hash"] = refiner_hash
    fmt = output_format or spec.get("output_format") or "png"
    quality = None if fmt == "png" else spec.get("quality")
    return encode_image_bytes(pixels, fmt, quality, parameters=text, record=record)


def _without_image_data(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with a base64 init image replaced by its digest: the PNG must not carry it."""
    image = spec.get("init_image")
    if not image or image.startswith(("s3://", "upload:")):  # a reference names the image
        return spec
    digest = hashlib.sha256(image.encode()).hexdigest()[:16]
    return {**spec, "init_image": f"base64:sha256:{digest} ({len(image)} chars)"}


def read_png_metadata(data: bytes) -> dict[str, str]:
    """`parameters` and `sdfarm` of a PNG, WebP or JPEG (a PNG's every text chunk), for tests,
    `sdfarm fetch` and `--from-png` (shared/image_formats.py reads them)."""
    return read_image_metadata(data)
