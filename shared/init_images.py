"""Init images as a job spec carries them, and the bounds every reader of one applies.

A job's `init_image` is one of:

- a reference to an image the farm stored itself, `upload:TENANT/sha256:HEX` (`POST /v1/uploads`,
  or a base64 image stored at submit: shared/uploads.py);
- an `s3://bucket/key` (accepted at submit only under the farm's uploads prefix or a prefix in
  SDFARM_INIT_IMAGE_PREFIXES: producer/init_refs.py);
- base64 data (a `data:` URL allowed), which submit replaces with a reference, so a job record
  never holds image bytes.

What can be checked without the pixels is checked from the header alone (`check_image`): the
format (PNG or JPEG) and the size the header claims, so a 69-byte header claiming 20000x20000
pixels is refused before anything would try to decode it. The header is read with the format's
own image class, not `Image.open`, whose decompression-bomb check warns (or fails) at Pillow's
global limit instead of at the farm's.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.config import Settings

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_INIT_IMAGE_CHARS",
    "MAX_INIT_IMAGE_PIXELS",
    "MAX_INIT_IMAGE_SIDE",
    "S3_REF_RE",
    "UPLOAD_REF_RE",
    "CheckedImage",
    "ImageLimits",
    "check_image",
    "check_init_image",
    "check_reference",
    "image_size",
    "init_image_bytes",
    "is_reference",
]

MAX_INIT_IMAGE_CHARS = 16_000_000  # base64 of a ~12 MB PNG; larger images belong in S3
MAX_INIT_IMAGE_SIDE = 4096  # pixels; bigger headers are refused before any decoding
MAX_INIT_IMAGE_PIXELS = MAX_INIT_IMAGE_SIDE * MAX_INIT_IMAGE_SIDE  # the most a setting may allow

S3_REF_RE = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/\S+$")
# The tenant part follows producer/tenants.py's rule for tenant names.
UPLOAD_REF_RE = re.compile(r"^upload:([a-z0-9][a-z0-9_.-]{0,63})/sha256:([0-9a-f]{64})$")
_DATA_URL_RE = re.compile(r"^data:image/[a-z]+;base64,")
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg"}


@dataclass(frozen=True)
class ImageLimits:
    """The most an init image may be: encoded bytes and pixels (width x height).

    Built from the settings `init_image_max_bytes` and `init_image_max_pixels` wherever an image
    enters (the upload route, submit) and where a worker reads one, so both refuse the same.
    """

    max_bytes: int = 12_000_000
    max_pixels: int = MAX_INIT_IMAGE_PIXELS

    @classmethod
    def of(cls, settings: Settings) -> ImageLimits:
        return cls(settings.init_image_max_bytes, settings.init_image_max_pixels)


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class CheckedImage:
    """What an image's header says: its format (PNG or JPEG), width and height."""

    format: str
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


def is_reference(value: str) -> bool:
    """Whether `init_image` names a stored image (s3:// or upload:) rather than holding one."""
    return value.startswith(("s3://", "upload:"))


def check_reference(value: str) -> None:
    """Refuse a reference that is not well formed (ValueError naming the form)."""
    if value.startswith("s3://"):
        if not S3_REF_RE.match(value) or _odd_segments(value):
            raise ValueError(f"init_image must look like s3://bucket/key, got {value[:80]!r}")
    elif not UPLOAD_REF_RE.match(value):
        raise ValueError(
            "init_image must look like upload:TENANT/sha256:HEX (64 hex digits), as "
            f"POST /v1/uploads returns it, got {value[:80]!r}"
        )


def check_init_image(value: str, size: tuple[int | None, int | None], *, resize: bool) -> None:
    """A job's `init_image` as JobSpec takes it: a reference of an allowed form, or base64 of an
    image of the job's `size` (unless the job has it resized)."""
    if is_reference(value):
        check_reference(value)
        return
    got = image_size(init_image_bytes(value))
    if None not in size and got != size and not resize:
        raise ValueError(
            f"init_image is {got[0]}x{got[1]} but the job is {size[0]}x{size[1]}; "
            "send an image of the job's size, or set resize_init to have it resized"
        )


def _odd_segments(address: str) -> bool:
    """A key with `.`, `..` or empty segments, which some stores fold into another key."""
    key = address.removeprefix("s3://").partition("/")[2]
    return "\\" in key or any(part in ("", ".", "..") for part in key.split("/"))


def init_image_bytes(value: str) -> bytes:
    """The bytes of a base64 init image (a `data:image/...;base64,` prefix allowed)."""
    try:
        return base64.b64decode(_DATA_URL_RE.sub("", value, count=1), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"init_image is neither s3://bucket/key nor valid base64 ({e})") from e


def check_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> CheckedImage:
    """The image's format and size from its header alone, within `limits` (ValueError naming
    the limit and its setting otherwise). Nothing is decoded."""
    if len(data) > limits.max_bytes:
        raise ValueError(
            f"init_image is {len(data)} bytes; at most {limits.max_bytes} are allowed "
            "(setting init_image_max_bytes)"
        )
    width, height = image_size(data)
    if width * height > limits.max_pixels:
        raise ValueError(
            f"init_image claims {width}x{height} = {width * height} pixels; at most "
            f"{limits.max_pixels} are allowed (setting init_image_max_pixels)"
        )
    return CheckedImage(_format_of(data) or "PNG", width, height)


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the image's header, refusing what is not a PNG or a JPEG and
    headers beyond the farm's hard bounds (MAX_INIT_IMAGE_PIXELS, MAX_INIT_IMAGE_SIDE)."""
    width, height = _header_size(data)
    if width * height > MAX_INIT_IMAGE_PIXELS:  # a header claiming billions of pixels
        raise ValueError(
            f"init_image claims {width}x{height}, more pixels than "
            f"{MAX_INIT_IMAGE_SIDE}x{MAX_INIT_IMAGE_SIDE}, the most allowed"
        )
    if max(width, height) > MAX_INIT_IMAGE_SIDE:
        raise ValueError(
            f"init_image is {width}x{height}; at most {MAX_INIT_IMAGE_SIDE} px per side"
        )
    return width, height


def _format_of(data: bytes) -> str | None:
    return next((name for magic, name in _MAGIC.items() if data.startswith(magic)), None)


def _header_size(data: bytes) -> tuple[int, int]:
    from PIL.JpegImagePlugin import JpegImageFile
    from PIL.PngImagePlugin import PngImageFile

    found = _format_of(data)
    image_class = {"PNG": PngImageFile, "JPEG": JpegImageFile}.get(found or "")
    try:
        if image_class is None:
            raise SyntaxError("neither PNG nor JPEG magic bytes")
        with image_class(io.BytesIO(data)) as image:
            width, height = image.size
    except (SyntaxError, OSError, ValueError, EOFError, struct.error) as e:
        raise ValueError(
            f"init_image is not a PNG or JPEG image ({len(data)} bytes decoded)"
        ) from e
    if width < 1 or height < 1:
        raise ValueError(f"init_image claims {width}x{height} pixels; it holds no image")
    return width, height
