"""POST /v1/uploads: store an init image once and get the reference jobs name it by.

The body is the image itself (`Content-Type: image/png` or `image/jpeg`) or a multipart form
with the image in its `file` field. It is read within the request deadlines of
`producer.body`, at most `init_image_max_bytes` of image, and its header is checked before
anything is stored: a PNG or JPEG claiming at most `init_image_max_pixels` (a decompression
bomb is a 422 here, never decoded). The image lies in the farm's store under the caller's
tenant, named by its SHA-256 (shared/uploads.py): the same bytes give the same reference and
one object (201 when it was stored now, 200 when the tenant had uploaded it before).
"""

from __future__ import annotations

import logging
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from producer.body import Body
from producer.farm import GUARDED, ApiError, CallerDep, Farm, FarmDep
from producer.schemas import ErrorBody, errors
from shared.errors import InvalidJob
from shared.init_images import ImageLimits
from shared.uploads import Upload, prepare_upload, store_upload

__all__ = ["UploadPublic", "router"]

log = logging.getLogger(__name__)

_IMAGE_TYPES = ("image/png", "image/jpeg")
_MULTIPART = "multipart/form-data"
_FORM_OVERHEAD_BYTES = 64 * 1024  # a form's boundaries and part headers, beyond the image
_HEADERS = BytesHeaderParser()

router = APIRouter(dependencies=GUARDED, tags=["uploads"], responses=errors(400, 401, 503))


class UploadPublic(BaseModel):
    """A stored init image: name it as a job's `init_image`."""

    ref: str = Field(description="`upload:TENANT/sha256:HEX`: the job field `init_image`.")
    sha256: str = Field(description="The SHA-256 of the image's bytes, in hex.")
    bytes: int
    format: str = Field(description="PNG or JPEG.")
    width: int
    height: int
    stored: bool = Field(description="True when stored now; false when it was there already.")


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "image/png": _BINARY,
        "image/jpeg": _BINARY,
        _MULTIPART: {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}


@router.post(
    "/v1/uploads",
    status_code=201,
    response_model=UploadPublic,
    summary="Store an init image (PNG or JPEG) once; returns the reference jobs use",
    responses={
        200: {"model": UploadPublic, "description": "The tenant had uploaded these bytes."},
        408: _error("The body stalled or took too long (body_idle_timeout_s, body_timeout_s)."),
        413: _error("The image is over `init_image_max_bytes`."),
        415: _error("A body that is neither image/png, image/jpeg nor multipart/form-data."),
        422: _error("Not a PNG or JPEG, or a header claiming more than init_image_max_pixels."),
    },
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def create_upload(request: Request, f: FarmDep, caller: CallerDep) -> JSONResponse:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in (*_IMAGE_TYPES, _MULTIPART):
        raise ApiError(415, f"send image/png, image/jpeg or {_MULTIPART}, not {media[:60]!r}")
    max_bytes = f.settings.init_image_max_bytes
    allowed = max_bytes + (_FORM_OVERHEAD_BYTES if media == _MULTIPART else 0)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > allowed:
        raise _too_large(max_bytes)
    raw = await _read(Body(request, f.settings), allowed, max_bytes)
    form = request.headers["content-type"] if media == _MULTIPART else None
    # Parsing, hashing and storing take one of ingestion's threads (as submits do): a 12 MB
    # image holds neither the event loop nor the status routes' pool.
    upload, stored = await to_thread.run_sync(
        _store, f, caller.name, raw, form, limiter=f.ingest_limiter
    )
    log.info("tenant %s: upload %s (%s)", caller.name, upload.ref, "new" if stored else "known")
    return JSONResponse(_public(upload, stored).model_dump(), status_code=201 if stored else 200)


def _store(f: Farm, tenant: str, raw: bytes, form: str | None) -> tuple[Upload, bool]:
    """The image of the body (of its form's `file` field), checked and stored for `tenant`."""
    data = raw if form is None else _form_file(form, raw)
    max_bytes = f.settings.init_image_max_bytes
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    try:
        upload = prepare_upload(data, tenant, f.storage.prefix, ImageLimits.of(f.settings))
    except ValueError as e:
        raise InvalidJob(str(e), [{"field": "file", "message": str(e)}]) from e
    return upload, store_upload(f.storage, upload)


async def _read(body: Body, allowed: int, max_bytes: int) -> bytes:
    body.limit = allowed  # the image's bound, not max_body_bytes
    try:
        return await body.read()
    except ApiError as e:
        if e.status == 413:
            raise _too_large(max_bytes) from None
        raise


def _form_file(content_type: str, raw: bytes) -> bytes:
    """The bytes of the form's `file` field (its only file, whatever its name, also does)."""
    parts = _form_parts(content_type, raw)
    named = [body for headers, body in parts if _param(headers, "name") == "file"]
    files = named or [body for headers, body in parts if _param(headers, "filename")]
    if len(files) != 1:
        found = f"{len(parts)} parts" if parts else "no form parts"
        raise InvalidJob(
            f"a {_MULTIPART} upload holds the image in one field named `file`; found {found}",
            [{"field": "file", "message": "missing"}],
        )
    return files[0]


def _form_parts(content_type: str, raw: bytes) -> list[tuple[Message, bytes]]:
    """Each part of a multipart body: its headers and its bytes (split at the boundary in one
    pass over the bytes, not line by line: an image is megabytes of arbitrary bytes)."""
    head = Message()
    head["Content-Type"] = content_type
    boundary = head.get_boundary()
    if not boundary:
        return []
    parts = []
    for chunk in (b"\r\n" + raw).split(b"\r\n--" + boundary.encode("latin-1"))[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        headers, _, body = chunk.partition(b"\r\n\r\n")
        parts.append((_HEADERS.parsebytes(headers.lstrip(b" \t").removeprefix(b"\r\n")), body))
    return parts


def _param(headers: Message, name: str) -> str | None:
    value = headers.get_param(name, header="content-disposition")
    return value if isinstance(value, str) else None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413, f"the image is larger than {max_bytes} bytes (setting init_image_max_bytes)"
    )


def _public(upload: Upload, stored: bool) -> UploadPublic:
    return UploadPublic(
        ref=upload.ref,
        sha256=upload.sha256,
        bytes=len(upload.data),
        format=upload.image.format,
        width=upload.image.width,
        height=upload.image.height,
        stored=stored,
    )
