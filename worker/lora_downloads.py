"""An S3 library's LoRAs on a worker's disk: downloaded once, kept while there is room.

1. Name: a LoRA's file is `<digest of its name>-<ETag>.safetensors` in the cache folder
   (`Settings.lora_disk_cache_dir`), so an object that changed (a new ETag) is another file: it
   is downloaded again, and the file of its old bytes deleted.
2. Download: to a `.part` file in the same folder, then renamed into place, so a worker killed
   mid-download never leaves a truncated LoRA under a name that would be trusted.
3. Room: files are kept in least-recently-used order up to `Settings.lora_disk_cache_bytes`;
   beyond it the oldest are deleted before a download (the one downloaded stays, even if it alone
   is bigger). This bound is apart from the adapters' (worker/loras.py, `lora_cache_bytes`):
   adapters hold memory, files only disk, so a bigger disk bound saves a download when a LoRA
   unloaded to make room is needed again.
4. Files left by an earlier process in the folder are kept, least recently used (by mtime)
   first; `.part` files are deleted.

A store that fails while a LoRA downloads raises StorageError (the chunk's jobs are handed back,
as for a folder library's unreadable file); an object gone from the store, InvalidJob.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from collections import OrderedDict
from pathlib import Path

from shared.errors import InvalidJob, StorageError
from shared.lora_library import SUFFIX, LoraFile, LoraLibrary
from shared.lora_s3 import S3LoraLibrary
from shared.s3_storage import S3Storage

__all__ = ["LoraDownloads", "default_cache_dir", "downloads_for"]

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where downloaded LoRAs go when `lora_disk_cache_dir` is unset."""
    return Path(tempfile.gettempdir()) / "sdfarm-loras"


class LoraDownloads:
    """The LoRA files one worker downloaded, least recently used first."""

    def __init__(self, storage: S3Storage, root: Path, max_bytes: int) -> None:
        self.storage = storage
        self.root = root
        self.max_bytes = max_bytes
        self._files: OrderedDict[Path, int] = OrderedDict()  # path -> size, oldest use first
        self.downloads = 0  # files downloaded from the store
        self.evictions = 0  # files deleted to stay within max_bytes
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.part"):
            stale.unlink(missing_ok=True)
        kept = sorted(root.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime_ns)
        for path in kept:
            self._files[path] = path.stat().st_size

    def counts(self) -> dict[str, int]:
        """The counters, for the worker's heartbeat."""
        return {"lora_downloads": self.downloads, "lora_download_evictions": self.evictions}

    def local_path(self, lora: LoraFile) -> tuple[Path, str | None]:
        """The LoRA's file on this disk and the ETag of its bytes, downloaded if needed; a
        folder library's file is its own path (ETag None)."""
        if lora.url is None or lora.etag is None:
            return lora.path, None
        target = self.root / _filename(lora.name, lora.etag)
        if target in self._files and target.is_file():
            self._files.move_to_end(target)
            os.utime(target)  # the order survives a restart (point 4)
            return target, lora.etag
        self._files.pop(target, None)
        return self._download(lora)

    def _download(self, lora: LoraFile) -> tuple[Path, str]:
        assert lora.url is not None
        key = lora.url.removeprefix(f"s3://{self.storage.bucket}/")
        self._make_room(lora.size_bytes)
        part = self.root / f"{_digest(lora.name)}-{uuid.uuid4().hex}.part"
        try:
            etag = self.storage.download(key, part)
            if etag is None:
                raise InvalidJob(f"LoRA {lora.name!r}: {lora.url} is no longer in the library")
            final = self.root / _filename(lora.name, etag)
            try:
                os.replace(part, final)
            except OSError as e:
                raise StorageError(f"LoRA {lora.name!r}: cannot write {final}: {e}") from e
        finally:
            part.unlink(missing_ok=True)
        for older in self.root.glob(f"{_digest(lora.name)}-*{SUFFIX}"):
            if older != final:  # the object's earlier bytes
                older.unlink(missing_ok=True)
                self._files.pop(older, None)
        size = final.stat().st_size
        self._files[final] = size
        self.downloads += 1
        log.info("LoRA %s downloaded from %s (%d bytes, ETag %s)", lora.name, lora.url, size, etag)
        return final, etag

    def _make_room(self, size_bytes: int) -> None:
        held = sum(self._files.values())
        for path, size in list(self._files.items()):
            if held + size_bytes <= self.max_bytes:
                return
            path.unlink(missing_ok=True)
            del self._files[path]
            held -= size
            self.evictions += 1
            log.info("downloaded LoRA file %s deleted to make room", path.name)


def downloads_for(
    library: LoraLibrary | None, root: Path | None, max_bytes: int
) -> LoraDownloads | None:
    """The download cache an S3 library needs (None for a folder's, or no library)."""
    if not isinstance(library, S3LoraLibrary):
        return None
    return LoraDownloads(library.storage, root or default_cache_dir(), max_bytes)


def _digest(name: str) -> str:
    # A name may hold characters a file name should not; the digest keeps each name's files apart.
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def _filename(name: str, etag: str) -> str:
    return f"{_digest(name)}-{etag.replace('/', '_')}{SUFFIX}"
