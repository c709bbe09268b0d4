"""A LoRA library on S3: `s3://bucket/prefix`, each `.safetensors` object directly under the
prefix named by its stem, read as a folder library is (shared/lora_library.py).

1. List: `list_objects_v2` of the prefix gives each object's key, size and ETag. The listing is
   taken again when it is older than `list_interval_s` (`Settings.lora_list_interval_s`), and at
   once for a name it lacks (again for that name after MISS_RELIST_S), so an upload is usable
   from its next submit on, without a restart; a removed or changed object shows within
   `list_interval_s`.
2. Headers: an object's safetensors header is read with two ranged GETs (its 8 bytes of length,
   then the JSON), only when its ETag or size changed since the last listing. A header above
   MAX_HEADER_BYTES is not read: the object is skipped, with a warning.
3. Hash: A1111's short hash is the SHA-256 of the bytes after the header, so it needs the whole
   object. The API does not compute it (it checks names and families only); the worker does,
   from the file it downloads (worker/lora_downloads.py), when it first loads the LoRA.

A listing that fails (the store down) keeps the last one and is tried again after
`list_interval_s`; reading S3 needs the farm's S3 settings (`s3_endpoint_url`, AWS_*).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from shared.errors import StorageError
from shared.lora_library import SUFFIX, LoraFile, LoraLibrary, lora_from_header
from shared.s3_storage import S3Object, S3Storage

__all__ = ["MAX_HEADER_BYTES", "S3LoraLibrary", "open_lora_library"]

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024 * 1024  # an SDXL LoRA's header is under 1 MB; more is not a LoRA
MISS_RELIST_S = 1.0  # a name the listing lacks lists again at most this often
_MISSES_KEPT = 1000  # missing names remembered for MISS_RELIST_S (users may send any name)


class S3LoraLibrary(LoraLibrary):
    """The LoRAs directly under one S3 prefix, by name, listed again when the listing is old.
    `root` is the prefix, and each LoRA's `path` its key; `url` and `etag` say where it is."""

    def __init__(self, storage: S3Storage, *, list_interval_s: float) -> None:
        super().__init__(Path(storage.prefix))
        self.storage = storage
        self.list_interval_s = list_interval_s
        self._folder = f"{storage.prefix.strip('/')}/" if storage.prefix.strip("/") else ""
        self._listed_at: float | None = None  # time.monotonic() of the last listing tried
        self._missed: dict[str, float] = {}  # names a lookup lacked, when it last listed for them

    @property
    def location(self) -> str:
        return f"s3://{self.storage.bucket}/{self._folder}"

    def refresh(self, *, force: bool = False) -> None:
        """List the prefix again if the last listing is older than `list_interval_s`."""
        with self._lock:
            now = time.monotonic()
            fresh = self._listed_at is not None and now - self._listed_at < self.list_interval_s
            if fresh and not force:
                return
            self._listed_at = now
            try:
                self._files = self._listed(self._files)
            except StorageError as e:  # keep what was listed; the next interval tries again
                log.warning("LoRA library %s cannot be listed: %s", self.location, e)

    def _read_missing(self, name: str) -> LoraFile | None:
        # A name that was never missing lists at once (it may have just been uploaded); one
        # submitted again and again lists at most every MISS_RELIST_S.
        now = time.monotonic()
        if now - self._missed.get(name, -MISS_RELIST_S) < MISS_RELIST_S:
            return None
        if len(self._missed) >= _MISSES_KEPT:
            self._missed.clear()
        self._missed[name] = now
        self.refresh(force=True)
        return self._files.get(name)

    def _listed(self, before: dict[str, LoraFile]) -> dict[str, LoraFile]:
        files: dict[str, LoraFile] = {}
        objects = self.storage.list_folder(self._folder)
        for item in sorted(objects, key=lambda o: o.key):
            if not item.key.endswith(SUFFIX) or "/" in item.key[len(self._folder) :]:
                continue
            name = item.key[len(self._folder) : -len(SUFFIX)]
            known = before.get(name)
            if known and (known.etag, known.size_bytes) == (item.etag, item.size_bytes):
                files[name] = known
                continue
            found = self._read_object(name, item)
            if found is None:
                log.warning("LoRA library: %s is not a LoRA sdfarm reads; skipped", item.key)
                continue
            files[name] = found
        log.info("LoRA library %s: %d LoRAs", self.location, len(files))
        return files

    def _read_object(self, name: str, item: S3Object) -> LoraFile | None:
        header = self._header(item.key)
        if header is None:
            return None
        url = f"s3://{self.storage.bucket}/{item.key}"
        return lora_from_header(
            name, Path(item.key), header, item.size_bytes, url=url, etag=item.etag
        )

    def _header(self, key: str) -> dict[str, Any] | None:
        """The object's safetensors header, by two ranged GETs; None when it has none."""
        head = self.storage.get_range(key, 0, 8)
        if head is None or len(head) < 8:
            return None
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES:
            log.warning(
                "LoRA library: %s has a %d-byte header, above the %d bytes read; skipped",
                key,
                length,
                MAX_HEADER_BYTES,
            )
            return None
        body = self.storage.get_range(key, 8, length) if length >= 2 else None
        if body is None or len(body) < length:
            return None
        try:
            header = json.loads(body)
        except ValueError:
            return None
        return header if isinstance(header, dict) else None


def open_lora_library(
    lora_dir: Path | str | None, *, endpoint_url: str | None, list_interval_s: float
) -> LoraLibrary | None:
    """The library `Settings.lora_dir` names: a folder's, an S3 prefix's, or None when unset."""
    if lora_dir is None:
        return None
    if isinstance(lora_dir, str) and lora_dir.startswith("s3://"):
        bucket, _, prefix = lora_dir.removeprefix("s3://").partition("/")
        storage = S3Storage(bucket, prefix.strip("/"), endpoint_url=endpoint_url)
        return S3LoraLibrary(storage, list_interval_s=list_interval_s)
    return LoraLibrary(Path(lora_dir))
