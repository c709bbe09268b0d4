"""The S3 store: any S3-compatible bucket through boto3 (AWS, MinIO, SeaweedFS).

botocore's errors are sorted here at the boundary: an answer that only a configuration change
can turn around (a wrong key, a missing bucket) becomes StorageRefused, the rest StorageError.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import StorageError, StorageRefused
from shared.object_keys import probe_key

__all__ = ["S3Object", "S3Storage", "is_missing"]

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class S3Object:
    """One object of a listing: its key, size and ETag (quotes stripped; it changes with the
    object's bytes)."""

    key: str
    size_bytes: int
    etag: str


def _error_code(error: BaseException) -> str | None:
    code = getattr(error, "response", {}).get("Error", {}).get("Code")
    return None if code is None else str(code)


def is_missing(error: BaseException) -> bool:
    """Does this S3 (botocore) error say that there is no such object?"""
    return _error_code(error) in MISSING


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

    def get_at(self, address: str, *, max_bytes: int | None = None) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _bucket_and_key(address)
        # A bounded read asks for one byte more than allowed: enough to tell "too big".
        span = {} if max_bytes is None else {"Range": f"bytes=0-{max_bytes}"}
        try:
            body: bytes = self.client.get_object(Bucket=bucket, Key=key, **span)["Body"].read()
        except (BotoCoreError, ClientError) as e:
            if is_missing(e):
                return None
            if span and _error_code(e) == "InvalidRange":  # an empty object has no byte 0
                return b""
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

    def list_folder(self, prefix: str) -> list[S3Object]:
        """The objects directly under `prefix` (a "folder": `prefix/` then no further `/`)."""
        from botocore.exceptions import BotoCoreError, ClientError

        folder = f"{prefix.rstrip('/')}/" if prefix else ""
        found: list[S3Object] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=folder, Delimiter="/"
            )
            for page in pages:
                for item in page.get("Contents", []):
                    etag = str(item.get("ETag", "")).strip('"')
                    found.append(S3Object(item["Key"], int(item["Size"]), etag))
        except (BotoCoreError, ClientError) as e:
            raise _s3_error(f"could not list s3://{self.bucket}/{folder}", e) from e
        return found

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        """`length` bytes of the object from `start` (fewer at its end); None when there is no
        such object."""
        from botocore.exceptions import BotoCoreError, ClientError

        span = f"bytes={start}-{start + length - 1}"
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=key, Range=span)[
                "Body"
            ].read()
        except (BotoCoreError, ClientError) as e:
            if is_missing(e):
                return None
            raise _s3_error(f"could not read s3://{self.bucket}/{key} ({span})", e) from e
        return body

    def download(self, key: str, path: Path) -> str | None:
        """Write the object to `path` (the caller renames it into place); its ETag, or None when
        there is no such object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            with path.open("wb") as f:
                for chunk in answer["Body"].iter_chunks(chunk_size=1024 * 1024):
                    f.write(chunk)
        except (BotoCoreError, ClientError) as e:
            if is_missing(e):
                return None
            raise _s3_error(f"could not read s3://{self.bucket}/{key}", e) from e
        except OSError as e:  # the local disk: another try (or another worker) may do
            raise StorageError(f"could not write s3://{self.bucket}/{key} to {path}: {e}") from e
        return str(answer.get("ETag", "")).strip('"')

    def url(self, key: str, expires_s: int) -> str | None:
        url: str = self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
        )
        return url

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


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
