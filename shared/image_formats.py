"""The image formats a job can be stored in (PNG, WebP, JPEG), their metadata, and thumbnails.

Each format carries two texts: A1111's `parameters` (the infotext) and sdfarm's JSON record.

| format | `parameters`                               | JSON record                          |
| ------ | ------------------------------------------ | ------------------------------------ |
| png    | tEXt chunk `parameters`                    | tEXt chunk `sdfarm`                  |
| webp   | EXIF UserComment (0x9286, Exif IFD)        | EXIF ImageDescription (0x010E, IFD0) |
| jpeg   | EXIF UserComment (0x9286, Exif IFD)        | EXIF ImageDescription (0x010E, IFD0) |

UserComment is written as A1111 writes it (piexif's `UserComment.dump(text, "unicode")`): the
8-byte code `UNICODE\\0`, then the text in UTF-16 big-endian, which A1111's PNG-info tab and
sd-parsers decode. ImageDescription is an ASCII tag, so the JSON is written with every non-ASCII
character escaped (`json.dumps`' default), which any JSON reader undoes. EXIF Software is `sdfarm`.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Literal

from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = [
    "DEFAULT_JPEG_QUALITY",
    "FORMATS",
    "MAX_JPEG_PROMPT_CHARS",
    "OUTPUT_FORMATS",
    "ImageFormat",
    "OutputFormatName",
    "encode_image_bytes",
    "format_of_key",
    "read_image_metadata",
    "thumbnail_webp",
]

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("png", "webp", "jpeg")
OutputFormatName = Literal["png", "webp", "jpeg"]
DEFAULT_JPEG_QUALITY = 90  # a JPEG job without `quality`; WebP without it is lossless
THUMBNAIL_QUALITY = 80  # lossy WebP: a 256 px preview needs no more
# A JPEG's EXIF lives in one APP1 segment of at most 64 KiB; UTF-16 takes two bytes a character,
# so prompts longer than this cannot be carried (shared/jobs.py refuses them at submit).
MAX_JPEG_PROMPT_CHARS = 15_000
_JPEG_EXIF_MAX_BYTES = 65_533
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_IMAGE_DESCRIPTION = 0x010E
_SOFTWARE = 0x0131
_UNICODE_CODE = b"UNICODE\0"  # EXIF's character-code prefix of a UTF-16 UserComment


@dataclass(frozen=True)
class ImageFormat:
    """One output format: its name in a job, the object key's extension and its Content-Type."""

    name: str
    extension: str
    mime: str  # its Content-Type
    pil_format: str


FORMATS: dict[str, ImageFormat] = {
    "png": ImageFormat("png", "png", "image/png", "PNG"),
    "webp": ImageFormat("webp", "webp", "image/webp", "WEBP"),
    "jpeg": ImageFormat("jpeg", "jpg", "image/jpeg", "JPEG"),
}
_BY_EXTENSION = {f.extension: f for f in FORMATS.values()} | {"jpeg": FORMATS["jpeg"]}


def format_of_key(key: str) -> ImageFormat:
    """The format of an object key or file name by its extension (PNG for one it lacks)."""
    extension = key.rsplit(".", 1)[-1].lower() if "." in key.rsplit("/", 1)[-1] else ""
    return _BY_EXTENSION.get(extension, FORMATS["png"])


def encode_image_bytes(
    pixels: Image.Image,
    output_format: str,
    quality: int | None,
    *,
    parameters: str,
    record: dict[str, object],
) -> bytes:
    """The image in `output_format` with `parameters` and the JSON `record` embedded (see the
    table above). WebP without `quality` is lossless; JPEG without it uses DEFAULT_JPEG_QUALITY."""
    if output_format == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        info.add_text("sdfarm", json.dumps(record))
        out = io.BytesIO()
        pixels.save(out, format="PNG", pnginfo=info, compress_level=4)
        return out.getvalue()
    exif = _exif(parameters, json.dumps(record))
    if output_format == "jpeg" and len(exif.tobytes()) > _JPEG_EXIF_MAX_BYTES:
        # Only a prompt of many non-ASCII characters gets here (each is 6 bytes of escaped JSON):
        # `parameters` is what readers need, so the JSON record gives way.
        log.warning(
            "job %s: JPEG EXIF too long for the JSON record; left out", record.get("job_id")
        )
        exif = _exif(parameters, None)
    out = io.BytesIO()
    if output_format == "webp":
        options: dict[str, object] = (
            {"lossless": True, "quality": 80} if quality is None else {"quality": quality}
        )
        pixels.save(out, format="WEBP", exif=exif, method=4, **options)
    elif output_format == "jpeg":
        rgb = pixels.convert("RGB")
        rgb.save(out, format="JPEG", exif=exif, quality=quality or DEFAULT_JPEG_QUALITY)
    else:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    return out.getvalue()


def _exif(parameters: str, record_json: str | None) -> Image.Exif:
    exif = Image.Exif()
    exif[_SOFTWARE] = "sdfarm"
    if record_json is not None:
        exif[_IMAGE_DESCRIPTION] = record_json  # ASCII: json.dumps escaped everything else
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE_CODE + parameters.encode("utf_16_be")
    return exif


def read_image_metadata(data: bytes) -> dict[str, str]:
    """`parameters` and `sdfarm` (the JSON record) of a PNG, WebP or JPEG, where present; for a
    PNG also its other text chunks. OSError (PIL's UnidentifiedImageError) for what is no image."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.format == "PNG":
            return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
        exif = image.getexif()
    found = {}
    comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes) and len(comment) >= len(_UNICODE_CODE):
        found["parameters"] = _user_comment_text(comment)
    description = exif.get(_IMAGE_DESCRIPTION)
    if isinstance(description, str) and exif.get(_SOFTWARE) == "sdfarm":
        found["sdfarm"] = description
    return found


def _user_comment_text(comment: bytes) -> str:
    """A UserComment's text by its 8-byte character code (as piexif's `UserComment.load`)."""
    code, body = comment[:8], comment[8:]
    if code == _UNICODE_CODE:
        return body.decode("utf_16_be", errors="replace")
    return body.decode("ascii" if code.startswith(b"ASCII") else "utf-8", errors="replace")


def thumbnail_webp(pixels: Image.Image, longest_px: int) -> bytes:
    """A lossy WebP of the image, its longest side `longest_px` (never enlarged)."""
    small = pixels.convert("RGB")
    small.thumbnail((longest_px, longest_px), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="WEBP", quality=THUMBNAIL_QUALITY, method=4)
    return out.getvalue()
