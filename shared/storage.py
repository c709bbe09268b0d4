"""Where finished images go: an S3-compatible bucket or a local directory.

The object key is derived from the job (`{prefix}/{batch_id}/{job_id}.png`), so a redelivered job
overwrites its image instead of adding a second one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from shared.errors import StorageError, StorageRefused

__all__ = [
    "FileStorage",
    "S3Storage",
    "Storage",
    "image_key",
    "is_missing",
    "open_storage",
    "probe_key",
]

log = logging.getLogger(__name__)

PROBE_FOLDER = ".sdfarm-probe"  # `check` writes (and removes) one small object here
# S3 error codes that mean the store answered and said no: only a configuration change helps.
# A HEAD request's answer has no body, so its code is the bare HTTP status ("403").
REFUSALS = frozenset(
    {
        "403",
        "AccessDenied",
        "AllAccessDisabled",
        "Forbidden",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
    }
)
# S3 error codes that mean there is no such object (a HEAD says "404", a GET "NoSuchKey").
MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


def _key(prefix: str, *parts: str) -> str:
    return "/".join([prefix.strip("/"), *parts]).lstrip("/")


def image_key(prefix: str, batch_id: str, job_id: str) -> str:
    return _key(prefix, batch_id, f"{job_id}.png")


def probe_key(prefix: str, name: str) -> str:
    return _key(prefix, PROBE_FOLDER, name)


def _error_code(error: BaseException) -> str | None:
    code = getattr(error, "response", {}).get("Error", {}).get("Code")
    return None if code is None else str(code)


def is_missing(error: BaseException) -> bool:
    """Does this S3 (botocore) error say that there is no such object?"""
    return _error_code(error) in MISSING


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

    def get_at(self, address: str) -> bytes | None:
        """The object at a full address, or None when there is none."""
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


class S3Storage:
    """Any S3-compatible store through boto3 (AWS, MinIO, SeaweedFS)."""

    scheme = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        public_endpoint_url: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        config = Config(
            # A few quick retries for a blip; the worker's own retries with backoff (and, when
            # the store stays down, handing the job back) are the policy for longer outages.
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=min(timeout_s, 5.0),  # a store that is down refuses or stalls here
            read_timeout=timeout_s,
            # MinIO and SeaweedFS refuse the newer default checksums; only send them when required.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
            signature_version="s3v4",  # presigned URLs carry X-Amz-Expires and work everywhere
        )
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        # Presigned URLs are for clients outside the farm's network: sign for the address they
        # can reach (signing needs no connection, so this client never talks to the store).
        self.presigner: Any = (
            boto3.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self.client
        )

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as e:
            raise _s3_error(f"could not store s3://{self.bucket}/{key}", e) from e

    def check(self, name: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        key = probe_key(self.prefix, name)
        self.put(key, b"sdfarm", "text/plain")
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            # Workers only need to write: a credential without delete is fine, the probe stays.
            log.info("could not remove the probe s3://%s/%s: %s", self.bucket, key, e)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as e:
            raise _s3_error(f"could not read s3://{self.bucket}/{key}", e) from e
        return body

    def exists(self, key: str) -> bool:
        return self.exists_at(self.describe(key))

    def get_at(self, address: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _bucket_and_key(address)
        try:
            body: bytes = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as e:
            if is_missing(e):
                return None
            raise _s3_error(f"could not read {address}", e) from e
        return body

    def exists_at(self, address: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _bucket_and_key(address)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            if is_missing(e):
                return False
            raise _s3_error(f"could not check {address}", e) from e
        return True

    def url(self, key: str, expires_s: int) -> str | None:
        url: str = self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
        )
        return url

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


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

    def get_at(self, address: str) -> bytes | None:
        key = self._key_of(address)
        return self.get(key) if self.exists(key) else None

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


def _bucket_and_key(address: str) -> tuple[str, str]:
    # Split by hand, not with urlparse: a key may hold "#" or "?", which are not URL parts here.
    bucket, _, key = address.removeprefix("s3://").partition("/")
    if not address.startswith("s3://") or not bucket or not key:
        raise ValueError(f"an S3 address looks like s3://bucket/key, not {address!r}")
    return bucket, key


def _s3_error(message: str, error: Exception) -> StorageError:
    """StorageRefused for an answer that only a configuration change can turn around."""
    code = _error_code(error)
    if code in REFUSALS:
        return StorageRefused(f"{message}: the store refused ({code}): {error}")
    return StorageError(f"{message}: {error}")


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
