"""`sdfarm fetch`: download a batch's images, resumably.

Each image is saved as `{job_id}.png`, `.webp` or `.jpg`, the extension of its object key (the
job's format). A file already on disk is skipped when it is intact: its size is the one the job
recorded, its SHA-256 matches when the job recorded one, and it is whole (a PNG: every chunk's CRC
checks out up to IEND; a WebP: its RIFF length is the file's; a JPEG: it ends with EOI), so a
download cut short or a flipped byte is fetched again. Files are written to a
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from shared.errors import SdfarmError
from shared.ids import batch_of, is_batch_id, is_job_id
from shared.image_formats import format_of_key

__all__ = [
    "FetchReport",
    "ManifestFile",
    "fetch_batch",
    "image_intact",
    "local_image",
    "png_intact",
    "save_image",
    "start_fetch",
]


class _Client(Protocol):
    """What `fetch_batch` needs of a client (`producer.client.FarmClient`)."""

    def jobs(self, batch_id: str, *, state: str | None = ...) -> Iterable[Mapping[str, Any]]: ...
    def image(self, job_id: str) -> bytes: ...
    def manifest(self, batch_id: str) -> Iterable[Mapping[str, Any]]: ...


log = logging.getLogger(__name__)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class FetchReport:
    """What a fetch did: files downloaded now, files already intact, and the manifest's path."""

    downloaded: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    manifest: Path | None = None

    def add(self, path: Path, intact: bool) -> None:
        (self.skipped if intact else self.downloaded).append(path)

    @property
    def images(self) -> list[Path]:
        return sorted(self.downloaded + self.skipped)


def png_intact(path: Path, expected_bytes: int | None, expected_sha256: str | None = None) -> bool:
    """Is the file there, of the recorded size and checksum, and a complete PNG?"""
    return _intact(path, expected_bytes, expected_sha256, _png_chunks_ok)


def image_intact(
    path: Path, expected_bytes: int | None, expected_sha256: str | None = None
) -> bool:
    """Is the file there, of the recorded size and checksum, and a complete image of the format
    its extension names (`.png`, `.webp`, `.jpg`)?"""
    whole = {"webp": _webp_whole, "jpeg": _jpeg_whole}.get(format_of_key(path.name).name)
    return _intact(path, expected_bytes, expected_sha256, whole or _png_chunks_ok)


def _intact(
    path: Path,
    expected_bytes: int | None,
    expected_sha256: str | None,
    whole: Callable[[bytes], bool],
) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if expected_bytes is not None and len(data) != expected_bytes:
        return False
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        return False
    return whole(data)


def _webp_whole(data: bytes) -> bool:
    """RIFF's length field counts the bytes after the first 8: a cut file has fewer."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    (length,) = struct.unpack("<I", data[4:8])
    return bool(length + 8 == len(data))


def _jpeg_whole(data: bytes) -> bool:
    """Starts with SOI and ends with EOI (a cut file lost its end)."""
    return data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")


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
    client: _Client,
    batch_id: str,
    out_dir: Path,
    *,
    on_file: Callable[[Path, bool], object] | None = None,
) -> FetchReport:
    """Download every succeeded image of the batch into `out_dir`, skipping intact files.

    Raises SdfarmError, before anything is written for it, for a job id that is not one of the
    batch's (a malformed or hostile answer). `AsyncFarmClient.fetch` takes the same steps.
    """
    report = start_fetch(batch_id, out_dir)
    for job in client.jobs(batch_id, state="succeeded"):
        path, intact = local_image(job, batch_id, out_dir)
        if not intact:
            save_image(path, client.image(path.stem), batch_id)
        report.add(path, intact)
        if on_file is not None:
            on_file(path, intact)
    with ManifestFile(out_dir) as manifest:
        for line in client.manifest(batch_id):
            manifest.write(line)
    report.manifest = manifest.path
    return report


def start_fetch(batch_id: str, out_dir: Path) -> FetchReport:
    """Check the batch id and make the folder; an empty report to fill."""
    if not is_batch_id(batch_id):
        raise SdfarmError(f"{batch_id[:40]!r} is not a batch id (b followed by 20 hex digits)")
    out_dir.mkdir(parents=True, exist_ok=True)
    return FetchReport()


def local_image(job: Mapping[str, Any], batch_id: str, out_dir: Path) -> tuple[Path, bool]:
    """Where a succeeded job's image goes (its key's extension), and whether an intact copy is
    already there."""
    result: dict[str, Any] = job.get("result") or {}
    extension = format_of_key(str(result.get("key") or "")).extension
    path = out_dir / f"{_checked_job_id(job.get('job_id'), batch_id)}.{extension}"
    return path, image_intact(path, result.get("bytes"), result.get("sha256"))


def save_image(path: Path, data: bytes, batch_id: str) -> None:
    """Write under a `.part` name, then rename: never a half image under the real name."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    part.replace(path)
    log.info("batch %s: fetched %s (%d bytes)", batch_id, path, len(data))


class ManifestFile:
    """`manifest.ndjson` in the folder, written to a `.part` name and renamed when complete."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "manifest.ndjson"
        self._part = self.path.with_name(self.path.name + ".part")
        self._handle: TextIO = self._part.open("w", encoding="utf-8")

    def __enter__(self) -> ManifestFile:
        return self

    def write(self, line: Mapping[str, Any]) -> None:
        self._handle.write(json.dumps(line, separators=(",", ":")) + "\n")

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self._handle.close()
        if kind is None:
            self._part.replace(self.path)
