"""img2img's starting images: read from the job (base64) or the farm's S3 store, checked, decoded.

The job spec already refused data that is not a PNG or JPEG and images of the wrong size at
submit (shared/jobs.py); this reads the pixels. An image is resized only when the job asked for
it (`resize_init`), with Lanczos as A1111's "just resize" does; otherwise a wrong size is refused
here too, since an `s3://` image could only be measured now.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.errors import InvalidJob
from shared.init_images import init_image_bytes
from shared.storage import Storage

__all__ = ["load_init_image", "read_init_image_bytes"]

log = logging.getLogger(__name__)


def read_init_image_bytes(value: str, storage: Storage | None) -> bytes:
    """The encoded image a job's `init_image` names: base64 data, or an object in S3.

    A missing object is an InvalidJob (retrying will not create it); a store that fails is a
    StorageError (retryable).
    """
    if not value.startswith("s3://"):
        try:
            return init_image_bytes(value)
        except ValueError as e:
            raise InvalidJob(str(e)) from e
    if storage is None or storage.scheme != "s3":
        raise InvalidJob(
            f"init_image {value} cannot be read: this worker's storage is not S3, "
            "so send the image as base64 data"
        )
    data = storage.get_at(value)
    if data is None:
        raise InvalidJob(f"init_image {value} does not exist")
    return data


def load_init_image(data: bytes, width: int, height: int, *, resize: bool = False) -> np.ndarray:
    """H x W x 3 uint8 RGB pixels of a PNG or JPEG, at width x height."""
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
