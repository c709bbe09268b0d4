"""Generation parameters embedded in each PNG: A1111's `parameters` text and a JSON chunk."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = ["SAMPLER_LABELS", "encode_png", "infotext", "read_png_metadata"]

# A1111's names for each sampler, so tools that read `parameters` recognise them.
SAMPLER_LABELS: dict[str, str] = {"lms": "LMS"}


def infotext(spec: dict[str, Any], *, model_name: str, model_hash: str | None = None) -> str:
    """The A1111 `parameters` text: prompt, `Negative prompt:` line when set, then settings."""
    lines = [spec["prompt"]]
    if spec.get("negative_prompt"):
        lines.append(f"Negative prompt: {spec['negative_prompt']}")
    settings = [
        f"Steps: {spec['steps']}",
        f"Sampler: {SAMPLER_LABELS.get(spec['scheduler'], spec['scheduler'])}",
        f"CFG scale: {spec['guidance']:g}",
        f"Seed: {spec['seed']}",
        f"Size: {spec['width']}x{spec['height']}",
    ]
    if model_hash:
        settings.append(f"Model hash: {model_hash}")
    settings.append(f"Model: {model_name}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def encode_png(
    pixels: Image.Image,
    spec: dict[str, Any],
    *,
    model_name: str,
    model_hash: str | None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """PNG bytes with the `parameters` chunk and an `sdfarm` JSON chunk holding the full spec."""
    info = PngInfo()
    info.add_text("parameters", infotext(spec, model_name=model_name, model_hash=model_hash))
    info.add_text("sdfarm", json.dumps({"spec": spec, "model_hash": model_hash, **(extra or {})}))
    out = io.BytesIO()
    pixels.save(out, format="PNG", pnginfo=info, compress_level=4)
    return out.getvalue()


def read_png_metadata(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG (for tests and `sdfarm fetch`)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
