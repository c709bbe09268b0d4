"""`sdfarm render`: one image, rendered locally with no Redis, Celery or object store.

The same loading and sampling code a worker runs, so a local render of a job's settings gives the
farm's image for it, pixel for pixel on the same device.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from shared.errors import RenderFailed
from worker.models import load_model
from worker.sampler import PassParams, PassResult, Row, render_pass

__all__ = ["render_to_file"]

logger = logging.getLogger(__name__)


def render_to_file(
    model_path: str,
    row: Row,
    params: PassParams,
    out: Path,
    *,
    device: str = "cpu",
    pnginfo: PngInfo | None = None,
) -> PassResult:
    """Load the model at `model_path`, render `row` and save it as a PNG at `out`."""
    model = load_model(Path(model_path).name or model_path, model_path, device=device)
    result = render_pass(model, [row], params)
    pixels = result.images[0]
    if pixels is None:  # the precision guard refused a NaN or black image
        raise RenderFailed(f"no image for seed {row.seed}: {result.errors[0]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(out, format="PNG", pnginfo=pnginfo)
    logger.info("rendered seed %d to %s", row.seed, out)
    return result
