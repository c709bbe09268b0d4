"""img2img's starting images: read from the farm's store (or a legacy base64 job), checked within
the farm's bounds, decoded.

Submit checked what it could (shared/init_images.py, producer/init_refs.py); an `s3://` object
is only seen here, so the same bounds apply again before any decoding: at most
`init_image_max_bytes` are read, and a header claiming more than `init_image_max_pixels` is
refused. Each refusal is an InvalidJob, which fails that job alone (`invalid_input`), never its
chunk. An image is resized only when the job asked for it (`resize_init`), with Lanczos as
A1111's "just resize" does; otherwise a wrong size is refused here too.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.errors import InvalidJob
from shared.init_images import DEFAULT_LIMITS, ImageLimits, check_image, init_image_bytes
from shared.storage import Storage
from shared.uploads import upload_address

__all__ = ["load_init_image", "read_init_image_bytes"]

log = logging.getLogger(__name__)


def read_init_image_bytes(
    value: str, storage: Storage | None, limits: ImageLimits = DEFAULT_LIMITS
) -> bytes:
    """The encoded image a job's `init_image` names: an upload, an object in S3, or (a job
    written before uploads) base64 data; no more than `limits.max_bytes` of it.

    A missing or oversized object is an InvalidJob (retrying will not change it); a store that
    fails is a StorageError (retryable).
    """
    if value.startswith("upload:"):
        if storage is None:
            raise InvalidJob(f"init image {value} cannot be read: this worker has no store")
        data = storage.get_at(upload_address(storage, value), max_bytes=limits.max_bytes)
    elif value.startswith("s3://"):
        if storage is None or storage.scheme != "s3":
            raise InvalidJob(
                f"init_image {value} cannot be read: this worker's storage is not S3, "
                "so send the image as base64 data"
            )
        data = storage.get_at(value, max_bytes=limits.max_bytes)
    else:
        try:
            return init_image_bytes(value)
        except ValueError as e:
            raise InvalidJob(str(e)) from e
    if data is None:
        raise InvalidJob(f"init_image {value} does not exist")
    if len(data) > limits.max_bytes:
        raise InvalidJob(
            f"its init image {value} is over {limits.max_bytes} bytes, the most allowed "
            "(setting init_image_max_bytes)"
        )
    return data


def load_init_image(
    data: bytes,
    width: int,
    height: int,
    *,
    resize: bool = False,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """H x W x 3 uint8 RGB pixels of a PNG or JPEG, at width x height; its header is checked
    against `limits` before anything is decoded."""
    try:
        check_image(data, limits)
    except ValueError as e:
        raise InvalidJob(f"its init image cannot be used: {e}") from e
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidJob(f"init_image is not a PNG or JPEG image ({len(data)} bytes)") from e
    if rgb.size != (width, height):
        if not resize:
            raise InvalidJob(
                f"init_image is {rgb.size[0]}x{rgb.size[1]} but the job is {width}x{height}; "
                "send an image of the job's size, or set resize_init to have it resized"
            )
        log.info("resizing an init image from %dx%d to %dx%d", *rgb.size, width, height)
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return np.array(rgb, dtype=np.uint8)  # a writable copy: torch refuses read-only arrays
