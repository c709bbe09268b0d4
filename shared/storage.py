"""Where finished images go: an S3-compatible bucket or a local directory.

The object key is derived from the job (`{prefix}/{batch_id}/{job_id}.png`, see
`shared.object_keys`), so a redelivered job overwrites its image instead of adding a second one.
This module holds what every store does (`Storage`), the directory store, and `open_storage`;
the S3 store is `shared.s3_storage`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from shared.errors import StorageError, StorageRefused
from shared.object_keys import PROBE_FOLDER, image_key, probe_key
from shared.s3_storage import S3Storage

__all__ = [
    "PROBE_FOLDER",
    "FileStorage",
    "S3Storage",
    "Storage",
    "image_key",
    "open_storage",
]

log = logging.getLogger(__name__)


class Storage(Protocol):
    """What the farm needs from an object store.

    `get`, `exists` and `put` take keys of the farm's own store (under `prefix`); `get_at` and
    `exists_at` take a full address as `describe` writes it (`s3://bucket/key`, in any bucket
    the store's credentials reach: an img2img job's init image). Each raises StorageRefused
    when the store answers and refuses, StorageError when it fails.
    """

    prefix: str
    scheme: str  # of the addresses `describe` writes and `get_at` reads: "s3" or "file"

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def get_at(self, address: str, *, max_bytes: int | None = None) -> bytes | None:
        """The object at a full address, or None when there is none; with `max_bytes`, no more
        than `max_bytes + 1` of its bytes, so a caller sees one too big without reading it all."""
        ...

    def exists_at(self, address: str) -> bool: ...

    def url(self, key: str, expires_s: int) -> str | None:
        """A short-lived URL for the object, or None when the store has none (file://)."""
        ...

    def describe(self, key: str) -> str:
        """The object's full address, for humans (`s3://bucket/key`, `file:///...`)."""
        ...

    def check(self, name: str) -> None:
        """Write and remove a small object named `name` under the probe folder, as a worker
        does at start: StorageRefused when the store refuses, StorageError when it fails."""
        ...


class FileStorage:
    """A local directory; writes are atomic (temp file, then rename)."""

    scheme = "file"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefix = ""

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StorageError(f"key {key!r} points outside {self.root}")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError as e:
            raise StorageError(f"could not write {path}: {e}") from e

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as e:
            raise StorageError(f"could not read {key}: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get_at(self, address: str, *, max_bytes: int | None = None) -> bytes | None:
        key = self._key_of(address)
        if not self.exists(key):
            return None
        if max_bytes is None:
            return self.get(key)
        try:
            with self._path(key).open("rb") as handle:
                return handle.read(max_bytes + 1)
        except OSError as e:
            raise StorageError(f"could not read {key}: {e}") from e

    def exists_at(self, address: str) -> bool:
        return self.exists(self._key_of(address))

    def _key_of(self, address: str) -> str:
        """The key of a `file://` address under this directory (what `describe` writes)."""
        parsed = urlparse(address)
        if parsed.scheme != "file":
            raise ValueError(f"a file store reads file:// addresses under {self.root}: {address}")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StorageError(f"{address} is outside {self.root}")
        return str(path.relative_to(self.root.resolve()))

    def check(self, name: str) -> None:
        key = probe_key(self.prefix, name)
        try:
            self.put(key, b"sdfarm", "text/plain")
        except StorageError as e:  # a directory this process may not write to will stay so
            raise StorageRefused(str(e)) from e
        self._path(key).unlink(missing_ok=True)

    def url(self, key: str, expires_s: int) -> str | None:
        return None

    def describe(self, key: str) -> str:
        return self._path(key).as_uri()


def open_storage(
    storage_url: str, *, endpoint_url: str | None = None, public_endpoint_url: str | None = None
) -> Storage:
    """Build the store named by `SDFARM_STORAGE_URL` (`s3://bucket/prefix` or `file:///dir`)."""
    parsed = urlparse(storage_url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage_url {storage_url!r} names no bucket (s3://bucket/prefix)")
        return S3Storage(
            parsed.netloc,
            parsed.path.strip("/"),
            endpoint_url=endpoint_url,
            public_endpoint_url=public_endpoint_url,
        )
    if parsed.scheme == "file":
        return FileStorage(Path(parsed.path))
    raise ValueError(f"storage_url must start with s3:// or file://, got {storage_url!r}")
