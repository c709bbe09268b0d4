"""Where objects lie in a store, for every kind of store: images, and the probe `check` writes.

The image key is derived from the job (`{prefix}/{batch_id}/{job_id}.png`, `.webp` or `.jpg` by
its format), and its thumbnail's too (`{prefix}/{batch_id}/thumbs/{job_id}.webp`), so a redelivered
job overwrites its image instead of adding a second one.
"""

from __future__ import annotations

import logging

__all__ = ["PROBE_FOLDER", "THUMBS_FOLDER", "image_key", "probe_key", "thumbnail_key"]

log = logging.getLogger(__name__)

PROBE_FOLDER = ".sdfarm-probe"  # `check` writes (and removes) one small object here
THUMBS_FOLDER = "thumbs"  # in a batch's folder: one small WebP a job


def _key(prefix: str, *parts: str) -> str:
    return "/".join([prefix.strip("/"), *parts]).lstrip("/")


def image_key(prefix: str, batch_id: str, job_id: str, extension: str = "png") -> str:
    """`extension` is the format's (`shared.image_formats.FORMATS[...].extension`)."""
    return _key(prefix, batch_id, f"{job_id}.{extension}")


def thumbnail_key(prefix: str, batch_id: str, job_id: str) -> str:
    return _key(prefix, batch_id, THUMBS_FOLDER, f"{job_id}.webp")


def probe_key(prefix: str, name: str) -> str:
    return _key(prefix, PROBE_FOLDER, name)
