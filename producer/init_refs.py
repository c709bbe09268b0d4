"""Init images at submit: base64 images become stored uploads, references are checked.

After `prepare_init_images` every job's `init_image` is a reference, never bytes: a base64 image
is checked against the farm's bounds (`init_image_max_bytes`, `init_image_max_pixels`), named by
its content and stored once per distinct image (shared/uploads.py), so a batch of 3,000 jobs
sharing one image writes one object and 3,000 small job records.

References are held to what the submitting tenant may read:

- `upload:TENANT/sha256:HEX` of the tenant's own uploads (another tenant's is refused);
- `s3://` keys under the tenant's own uploads folder or a prefix of SDFARM_INIT_IMAGE_PREFIXES.

Any other key is refused with one message and without touching the store, so the refusal says
nothing of whether such an object exists. Only where the tenant may read (its own uploads, the
operator's prefixes) is a missing object reported at submit; an object there that is not a
usable image fails its job at the worker (`invalid_input`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.config import Settings
from shared.errors import InvalidJob, StorageError, StorageRefused
from shared.init_images import ImageLimits, init_image_bytes, is_reference
from shared.jobs import JobSpec
from shared.storage import Storage, open_storage
from shared.uploads import (
    Upload,
    parse_upload_ref,
    prepare_upload,
    store_upload,
    upload_address,
    uploads_address,
)

__all__ = ["PreparedImages", "prepare_init_images"]

log = logging.getLogger(__name__)

_MAX_KEYS_CHECKED = 100  # distinct references looked up at submit; the worker reports the rest
_MAX_REPORTED = 20  # problems listed in one refusal, as producer.submit lists them


@dataclass
class PreparedImages:
    """The jobs with references in place of images, and the images still to store."""

    specs: list[JobSpec]
    uploads: list[Upload] = field(default_factory=list)
    storage: Storage | None = None

    def store(self) -> None:
        """Store the new images (before the jobs that name them are written)."""
        for upload in self.uploads:
            assert self.storage is not None  # there are uploads only where a store was opened
            store_upload(self.storage, upload)


def prepare_init_images(
    specs: list[JobSpec],
    settings: Settings,
    tenant: str,
    storage: Storage | None = None,
) -> PreparedImages:
    """Replace each base64 init image by its upload reference and check every reference;
    InvalidJob naming the first bad job (and the rest in `details`) otherwise."""
    if not any(spec.init_image for spec in specs):
        return PreparedImages(specs)
    store = _Lazy(storage, settings)
    limits = ImageLimits.of(settings)
    inline: dict[str, Upload | str] = {}  # base64 text -> its upload, or why it is refused
    refs: dict[str, int] = {}  # reference -> the first job naming it
    problems: list[dict[str, Any]] = []
    out: list[JobSpec] = []
    for index, spec in enumerate(specs):
        value = spec.init_image
        if value is None or is_reference(value):
            if value is not None:
                refs.setdefault(value, index)
            out.append(spec)
            continue
        if value not in inline:  # decoded and hashed once per distinct image
            inline[value] = _prepared(value, tenant, store().prefix, limits)
        upload = inline[value]
        if isinstance(upload, str):
            if len(problems) < _MAX_REPORTED:
                problems.append({"job": index, "field": "init_image", "message": upload})
            out.append(spec)
            continue
        out.append(spec.model_copy(update={"init_image": upload.ref}))
    problems += _check_refs(refs, settings, tenant, store)
    if problems:
        problems.sort(key=lambda p: int(p["job"]))
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidJob(
            f"job {first['job']}, field `init_image`: {first['message']}{more}", problems
        )
    unique = list({u.key: u for u in inline.values() if isinstance(u, Upload)}.values())
    return PreparedImages(out, unique, store.opened)


def _prepared(value: str, tenant: str, prefix: str, limits: ImageLimits) -> Upload | str:
    """The upload a base64 image becomes, or why it cannot be one."""
    try:
        return prepare_upload(init_image_bytes(value), tenant, prefix, limits)
    except ValueError as e:
        return str(e)


class _Lazy:
    """The farm's store, opened at first use (boto3 is only loaded when a job needs it)."""

    def __init__(self, storage: Storage | None, settings: Settings) -> None:
        self.opened = storage
        self.settings = settings

    def __call__(self) -> Storage:
        if self.opened is None:
            self.opened = open_storage(
                self.settings.storage_url, endpoint_url=self.settings.s3_endpoint_url
            )
        return self.opened


def _check_refs(
    refs: dict[str, int], settings: Settings, tenant: str, store: Callable[[], Storage]
) -> list[dict[str, Any]]:
    problems: list[dict[str, Any]] = []
    readable: dict[str, tuple[int, str]] = {}  # ref -> (job, its address): may be looked up
    for ref, index in refs.items():
        if ref.startswith("s3://") and store().scheme != "s3":
            raise InvalidJob(
                f"job {index}, field `init_image`: this farm stores images in "
                f"{settings.storage_url}, not S3; send the image as base64 data or POST it to "
                "/v1/uploads",
                [{"job": index, "field": "init_image", "message": "s3:// keys need S3 storage"}],
            )
        address = _readable_address(ref, tenant, settings, store())
        if address is None:
            if len(problems) < _MAX_REPORTED:
                problems.append(_problem(index, ref, _foreign(ref, tenant, settings, store())))
        else:
            readable[ref] = (index, address)
    for ref, (index, address) in list(readable.items())[:_MAX_KEYS_CHECKED]:
        why = _missing(store(), address)
        if why is not None:
            problems.append(
                _problem(index, ref, f"init_image {ref} cannot be read by the farm ({why})")
            )
    return problems


def _readable_address(ref: str, tenant: str, settings: Settings, storage: Storage) -> str | None:
    """The address the tenant may read `ref` at, or None when it may not."""
    if ref.startswith("upload:"):
        owner, _ = parse_upload_ref(ref)
        return upload_address(storage, ref) if owner == tenant else None
    allowed = [uploads_address(storage, tenant), *settings.init_image_prefixes]
    return ref if any(ref.startswith(prefix) for prefix in allowed) else None


def _foreign(ref: str, tenant: str, settings: Settings, storage: Storage) -> str:
    """The one message for a reference the tenant may not read, whatever the store holds."""
    prefixes = ", ".join(settings.init_image_prefixes) or "none set"
    return (
        f"init_image {ref} cannot be read by the farm: a job may name its own uploads "
        f"(upload:{tenant}/sha256:..., from POST /v1/uploads), s3:// keys under "
        f"{uploads_address(storage, tenant)} or under SDFARM_INIT_IMAGE_PREFIXES ({prefixes})"
    )


def _missing(storage: Storage, address: str) -> str | None:
    """Why the object at `address` cannot be read, or None when it is there (or the store is
    failing: the worker reads it later, or says why not)."""
    try:
        return None if storage.exists_at(address) else "no such object"
    except StorageRefused:
        return "the store refuses to show it"
    except StorageError as e:
        log.warning("could not check init image %s at submit: %s", address, e)
        return None


def _problem(index: int, ref: str, message: str) -> dict[str, Any]:
    return {"job": index, "field": "init_image", "value": ref, "message": message}
