"""Init images as a job spec carries them: base64 data (a `data:` URL allowed) or an s3:// key.

What can be checked without the pixels is checked at submit from the header alone: the format
(PNG or JPEG) and the size, so a 69-byte header claiming 20000x20000 pixels is refused there,
long before anything would try to decode it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

__all__ = [
    "MAX_INIT_IMAGE_CHARS",
    "MAX_INIT_IMAGE_SIDE",
    "S3_REF_RE",
    "image_size",
    "init_image_bytes",
]

MAX_INIT_IMAGE_CHARS = 16_000_000  # base64 of a ~12 MB PNG; larger images belong in S3
MAX_INIT_IMAGE_SIDE = 4096  # pixels; bigger headers are refused before any decoding

S3_REF_RE = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/\S+$")
_DATA_URL_RE = re.compile(r"^data:image/[a-z]+;base64,")


def init_image_bytes(value: str) -> bytes:
    """The bytes of a base64 init image (a `data:image/...;base64,` prefix allowed)."""
    try:
        return base64.b64decode(_DATA_URL_RE.sub("", value, count=1), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"init_image is neither s3://bucket/key nor valid base64 ({e})") from e


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the image's header, refusing what is not a PNG or a JPEG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as image:
            size: tuple[int, int] = image.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(
            f"init_image is not a PNG or JPEG image ({len(data)} bytes decoded)"
        ) from e
    except Image.DecompressionBombError as e:  # a header claiming billions of pixels
        raise ValueError(
            f"init_image claims more pixels than {MAX_INIT_IMAGE_SIDE}x{MAX_INIT_IMAGE_SIDE}, "
            f"the most allowed ({e})"
        ) from e
    if max(size) > MAX_INIT_IMAGE_SIDE:
        raise ValueError(
            f"init_image is {size[0]}x{size[1]}; at most {MAX_INIT_IMAGE_SIDE} px per side"
        )
    return size
