"""Init images the farm stores itself: once per tenant and content, referenced by jobs.

An upload lies in the farm's own store under `{prefix}/uploads/{tenant}/{sha256}` (S3 or a
directory alike) and is named by the reference `upload:{tenant}/sha256:{sha256}`, which a job
carries as `init_image`. The same bytes from the same tenant are the same object and the same
reference, so 3,000 jobs sharing an image cost one image.

Uploads are kept per tenant because digests are not secrets: an image's metadata, a manifest or a
job record shows them, and a tenant that learnt another's digest must not render from that
tenant's image. A tenant can only reference its own folder (producer/init_refs.py), and whether
an image is already stored is only ever answered for the tenant's own uploads.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from shared.init_images import UPLOAD_REF_RE, CheckedImage, ImageLimits, check_image
from shared.storage import Storage

__all__ = [
    "UPLOADS_FOLDER",
    "Upload",
    "parse_upload_ref",
    "prepare_upload",
    "store_upload",
    "upload_address",
    "upload_key",
    "upload_ref",
    "uploads_address",
]

log = logging.getLogger(__name__)

UPLOADS_FOLDER = "uploads"  # beside the batches' folders, whose names start with `b`


@dataclass(frozen=True)
class Upload:
    """A checked image ready to store: its reference, key, bytes and header facts."""

    ref: str
    key: str
    data: bytes
    image: CheckedImage

    @property
    def sha256(self) -> str:
        return self.ref.rsplit(":", 1)[1]


def upload_ref(tenant: str, digest: str) -> str:
    return f"upload:{tenant}/sha256:{digest}"


def parse_upload_ref(ref: str) -> tuple[str, str]:
    """(tenant, sha256) of an `upload:` reference; ValueError when it is not one."""
    found = UPLOAD_REF_RE.match(ref)
    if found is None:
        raise ValueError(f"not an upload reference: {ref[:80]!r}")
    return found.group(1), found.group(2)


def upload_key(prefix: str, tenant: str, digest: str) -> str:
    return "/".join([prefix.strip("/"), UPLOADS_FOLDER, tenant, digest]).lstrip("/")


def upload_address(storage: Storage, ref: str) -> str:
    """The full address (`s3://...` or `file://...`) of the object an `upload:` ref names."""
    tenant, digest = parse_upload_ref(ref)
    return storage.describe(upload_key(storage.prefix, tenant, digest))


def uploads_address(storage: Storage, tenant: str) -> str:
    """The address of `tenant`'s uploads folder, ending in `/` (what its s3:// refs start with)."""
    return storage.describe(upload_key(storage.prefix, tenant, "x"))[:-1]


def prepare_upload(data: bytes, tenant: str, prefix: str, limits: ImageLimits) -> Upload:
    """Check the image's header against `limits` (ValueError) and name it by its content."""
    image = check_image(data, limits)
    digest = hashlib.sha256(data).hexdigest()
    return Upload(upload_ref(tenant, digest), upload_key(prefix, tenant, digest), data, image)


def store_upload(storage: Storage, upload: Upload) -> bool:
    """Store the image unless its object exists already; True when it was written now.

    Content-addressed, so a race between two writers of the same bytes writes the same object.
    """
    if storage.exists(upload.key):
        return False
    storage.put(upload.key, upload.data, upload.image.content_type)
    log.info("stored init image %s (%d bytes)", upload.ref, len(upload.data))
    return True
