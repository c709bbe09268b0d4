"""`sdfarm fetch`: download a batch's images, resumably.

A file already on disk is skipped when it is intact: its size is the one the job recorded, its
SHA-256 matches when the job recorded one, and it is a whole PNG (every chunk's CRC checks out
up to IEND), so a download cut short or a flipped byte is fetched again. Files are written to a
`.part` name and renamed, so an interrupted fetch never leaves a half image under the real name.
The batch's manifest is saved beside the images. A job id is checked before it names a file:
the server's answer is not trusted to stay inside the output folder (`../x` is refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import SdfarmError
from shared.ids import batch_of, is_batch_id, is_job_id

if TYPE_CHECKING:
    from producer.client import FarmClient

__all__ = ["FetchReport", "fetch_batch", "png_intact"]

log = logging.getLogger(__name__)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class FetchReport:
    """What a fetch did: files downloaded now, files already intact, and the manifest's path."""

    downloaded: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    manifest: Path | None = None

    @property
    def images(self) -> list[Path]:
        return sorted(self.downloaded + self.skipped)


def png_intact(path: Path, expected_bytes: int | None, expected_sha256: str | None = None) -> bool:
    """Is the file there, of the recorded size and checksum, and a complete PNG?"""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if expected_bytes is not None and len(data) != expected_bytes:
        return False
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        return False
    return _png_chunks_ok(data)


def _png_chunks_ok(data: bytes) -> bool:
    if not data.startswith(_PNG_SIGNATURE):
        return False
    at = len(_PNG_SIGNATURE)
    while at + 12 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        end = at + 8 + length
        if end + 4 > len(data):
            return False
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(data[at + 4 : end]) != crc:
            return False
        if kind == b"IEND":
            return bool(end + 4 == len(data))
        at = end + 4
    return False


def _checked_job_id(job_id: object, batch_id: str) -> str:
    """The id itself, if it is a job id of `batch_id`: only then may it name a file."""
    if not isinstance(job_id, str) or not is_job_id(job_id) or batch_of(job_id) != batch_id:
        shown = repr(job_id)[:60]
        raise SdfarmError(
            f"the farm listed {shown} as a job of batch {batch_id}, which is not one of its job "
            "ids; nothing was written for it (is SDFARM_API_URL the farm you meant?)"
        )
    return job_id


def fetch_batch(
    client: FarmClient,
    batch_id: str,
    out_dir: Path,
    *,
    on_file: Callable[[Path, bool], None] | None = None,
) -> FetchReport:
    """Download every succeeded image of the batch into `out_dir`, skipping intact files.

    Raises SdfarmError, before anything is written for it, for a job id that is not one of the
    batch's (a malformed or hostile answer).
    """
    if not is_batch_id(batch_id):
        raise SdfarmError(f"{batch_id[:40]!r} is not a batch id (b followed by 20 hex digits)")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = FetchReport()
    for job in client.jobs(batch_id, state="succeeded"):
        result: dict[str, Any] = job.get("result") or {}
        path = out_dir / f"{_checked_job_id(job.get('job_id'), batch_id)}.png"
        if png_intact(path, result.get("bytes"), result.get("sha256")):
            report.skipped.append(path)
        else:
            data = client.image(path.stem)
            part = path.with_name(path.name + ".part")
            part.write_bytes(data)
            part.replace(path)
            log.info("batch %s: fetched %s (%d bytes)", batch_id, path, len(data))
            report.downloaded.append(path)
        if on_file is not None:
            on_file(path, path in report.skipped)
    manifest = out_dir / "manifest.ndjson"
    part = manifest.with_name(manifest.name + ".part")
    with part.open("w", encoding="utf-8") as handle:
        for line in client.manifest(batch_id):
            handle.write(json.dumps(line, separators=(",", ":")) + "\n")
    part.replace(manifest)
    report.manifest = manifest
    return report
