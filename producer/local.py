"""`sdfarm up`: a whole farm on this machine — Redis, an S3 store, the API and N workers.

Everything binds to 127.0.0.1 and lives under one state directory, so a second `sdfarm up` over
the same directory picks up the queue (Redis AOF) and the images where the first one stopped:

    STATE_DIR/redis/    Redis data (AOF) and redis.log
    STATE_DIR/s3/       SeaweedFS data, its identities file and seaweedfs.log   (storage "s3")
    STATE_DIR/images/   the images                                               (storage "file")
    STATE_DIR/models/   the tiny model, made when no model is given
    STATE_DIR/logs/     api.log, worker-N.log, make-tiny.log
    STATE_DIR/env       `export` lines for the farm's settings, for `source`

This module starts and stops the farm (`LocalFarm`); the terminal session of `sdfarm up` around
it (the summary it prints, Ctrl-C, a child that dies) is `producer.local_session`.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import redis

from producer.processes import ManagedProcess, free_port
from producer.redis_server import RedisService, redis_service
from producer.seaweedfs import S3Service, seaweedfs_service
from shared.config import Settings
from shared.errors import ServiceStartError
from shared.keys import Keys
from shared.ledger.workers import live_workers
from shared.redis_client import connect

__all__ = ["LocalFarm", "make_tiny_model"]

log = logging.getLogger(__name__)

BUCKET = "sdfarm"
STORAGES = ("s3", "file")
API_READY_TIMEOUT_S = 60.0  # the API imports FastAPI and connects to Redis: seconds at most
WORKER_READY_TIMEOUT_S = 600.0  # a worker loading real weights from a cold disk can take minutes
WORKER_STOP_TIMEOUT_S = 30.0  # a stopping worker first finishes the chunk it is rendering


def make_tiny_model(model_dir: Path, log_dir: Path) -> Path:
    """Write the tiny model with `sdfarm model make-tiny` (a subprocess: it needs torch), once."""
    if (model_dir / "model_index.json").is_file():
        return model_dir
    # Written beside the target and renamed, so an interrupted run never leaves half a model.
    partial = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "make-tiny.log"
    argv = [sys.executable, "-m", "producer", "model", "make-tiny", str(partial)]
    with log_path.open("ab") as out:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=False)
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise ServiceStartError(
            f"`sdfarm model make-tiny` failed with status {done.returncode}; "
            f"the end of {log_path}:\n{tail}"
        )
    partial.rename(model_dir)
    return model_dir


class LocalFarm:
    """Redis, an S3 store (or a directory), the API and N worker processes, started in order.

    `start()` returns once the API answers /healthz; workers may still be loading their models
    (`wait_for_workers()` waits for their heartbeats). `stop()` stops everything in reverse.
    """

    redis: RedisService
    api: ManagedProcess
    api_url: str

    def __init__(
        self,
        *,
        state_dir: Path,
        workers: int = 1,
        models: Mapping[str, str] | None = None,
        storage: str = "s3",
        api_port: int | None = None,
        device: str = "cpu",
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        if workers < 0:
            raise ValueError(f"`workers` must be 0 or more, got {workers}")
        if storage not in STORAGES:
            raise ValueError(f"`storage` must be one of {', '.join(STORAGES)}, got {storage!r}")
        self.state_dir = Path(state_dir).resolve()
        self.log_dir = self.state_dir / "logs"
        self.worker_count = workers
        self.models = dict(models or {})
        self.storage = storage
        self.api_port = api_port
        self.device = device
        self.extra_env = dict(extra_env or {})
        self.api_key = secrets.token_urlsafe(32)
        self.webhook_secret = secrets.token_urlsafe(32)  # signs batch-end callbacks
        self.s3: S3Service | None = None
        self.workers: list[ManagedProcess] = []
        self.env: dict[str, str] = {}
        self._started: list[ManagedProcess] = []  # in start order, for the reverse stop
        self._ledger_redis: redis.Redis | None = None

    # -- starting and stopping --------------------------------------------------------------------

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.env_file.unlink(missing_ok=True)  # a script waiting for it must not read a stale one
        if not self.models:
            tiny = make_tiny_model(self.state_dir / "models" / "tiny", self.log_dir)
            self.models = {"tiny": str(tiny)}
        # Each child is recorded before it starts, so that an interrupted start stops it too.
        self.redis = redis_service(self.state_dir / "redis")
        self._started.append(self.redis.process)
        self.redis.start()
        self._ledger_redis = connect(Settings(redis_url=self.redis.url))
        if self.storage == "s3":
            self.s3 = seaweedfs_service(
                self.state_dir / "s3",
                access_key=f"sdfarm{secrets.token_hex(8)}",
                secret_key=secrets.token_urlsafe(30),
                bucket=BUCKET,
            )
            self._started.append(self.s3.process)
            self.s3.start()
        self.env = self._child_env()
        port = self.api_port or free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "producer", "api", "--host", "127.0.0.1", "--port", str(port)]
        self.api = ManagedProcess(
            "api", argv, log_dir=self.log_dir, env=self.env, ready=self._api_healthy
        )
        self._started.append(self.api)
        self.api.start()
        self.api.wait_ready(API_READY_TIMEOUT_S)
        for index in range(self.worker_count):
            self.workers.append(self._worker(index))
            self._started.append(self.workers[-1])
            self.workers[-1].start()
        self._write_env_file()

    def stop(self) -> None:
        """Stop every child, last started first; a child that will not stop is killed."""
        for process in reversed(self._started):
            timeout_s = WORKER_STOP_TIMEOUT_S if process in self.workers else 10.0
            try:
                process.stop(timeout_s)
            except Exception:
                log.exception("could not stop %s", process.name)
        self._started.clear()
        self.env_file.unlink(missing_ok=True)  # it describes a farm that is gone
        if self._ledger_redis is not None:
            self._ledger_redis.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- workers ----------------------------------------------------------------------------------

    def _worker(self, index: int) -> ManagedProcess:
        argv = [sys.executable, "-m", "producer", "worker", "--device", self.device]
        for name, path in self.models.items():
            argv += ["--model", f"{name}={path}"]
        process = ManagedProcess(f"worker-{index}", argv, log_dir=self.log_dir, env=self.env)
        # Ready once its heartbeat is in the registry: by then its models are loaded.
        process.ready = functools.partial(self._worker_is_live, process)
        return process

    def _worker_is_live(self, process: ManagedProcess) -> bool:
        assert self._ledger_redis is not None
        return process.pid in {w.get("pid") for w in live_workers(self._ledger_redis, Keys())}

    def wait_for_workers(self, timeout_s: float = WORKER_READY_TIMEOUT_S) -> None:
        """Wait until every worker has published its heartbeat (its models are loaded)."""
        deadline = time.monotonic() + timeout_s
        for process in self.workers:
            process.wait_ready(max(0.0, deadline - time.monotonic()))

    def kill_worker(self, index: int) -> None:
        """SIGKILL one worker, as a crash would (for fault tests)."""
        self.workers[index].kill()

    def restart_worker(self, index: int, extra_env: Mapping[str, str] | None = None) -> None:
        """Start a worker again (stopping it first if it still runs) with the same command line.

        `extra_env` overrides the farm's settings for this worker until its next restart (the
        fault suite turns a test hook on in one worker this way); None means the farm's own.
        """
        self.workers[index].stop(WORKER_STOP_TIMEOUT_S)
        self.workers[index].env = {**self.env, **(extra_env or {})}
        self.workers[index].start()

    def dead_processes(self) -> list[ManagedProcess]:
        """Started children that have exited since (a healthy farm has none)."""
        return [p for p in self._started if p.returncode is not None]

    def live_worker_indexes(self) -> set[int]:
        return {i for i, w in enumerate(self.workers) if w.is_running() and self._worker_is_live(w)}

    # -- environment ------------------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",  # logs reach the log files as they happen
            "SDFARM_REDIS_URL": self.redis.url,
            "SDFARM_MODELS": ",".join(f"{name}={path}" for name, path in self.models.items()),
            "SDFARM_API_KEYS": self.api_key,
            "SDFARM_WEBHOOK_SECRET": self.webhook_secret,
        }
        # A local farm binds to 127.0.0.1; its webhook receivers are usually there too.
        env.setdefault("SDFARM_WEBHOOK_ALLOW_NETWORKS", "127.0.0.0/8,::1/128")
        if self.s3 is not None:
            env |= {
                "SDFARM_STORAGE_URL": f"s3://{self.s3.bucket}/images",
                "SDFARM_S3_ENDPOINT_URL": self.s3.endpoint_url,
                "AWS_ACCESS_KEY_ID": self.s3.access_key,
                "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
                "AWS_DEFAULT_REGION": self.s3.region,
            }
        else:
            env["SDFARM_STORAGE_URL"] = f"file://{self.state_dir / 'images'}"
            env.pop("SDFARM_S3_ENDPOINT_URL", None)
        if self.device == "cpu" and "OMP_NUM_THREADS" not in env:
            # N CPU workers that each start a thread per core would fight over the cores.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, self.worker_count)))
        return env | self.extra_env  # the caller's settings win (the fault suite's short timeouts)

    def client_env(self) -> dict[str, str]:
        """What a client (or a worker started by hand) needs to use this farm."""
        names = [
            "SDFARM_REDIS_URL", "SDFARM_STORAGE_URL", "SDFARM_S3_ENDPOINT_URL", "SDFARM_MODELS",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "SDFARM_WEBHOOK_SECRET",
        ]  # fmt: skip
        shared = {name: self.env[name] for name in names if name in self.env}
        return {"SDFARM_API_URL": self.api_url, "SDFARM_API_KEY": self.api_key, **shared}

    @property
    def env_file(self) -> Path:
        """`export` lines for the farm's settings; present only while the farm runs."""
        return self.state_dir / "env"

    def _write_env_file(self) -> None:
        lines = [f"export {name}={shlex.quote(value)}" for name, value in self.client_env().items()]
        partial = self.env_file.with_name("env.partial")
        partial.unlink(missing_ok=True)
        partial.touch(mode=0o600)  # it holds the API key and the S3 secret
        partial.write_text("\n".join(lines) + "\n")
        partial.replace(self.env_file)  # whole or absent: `sdfarm up` scripts poll for it

    def _api_healthy(self) -> bool:
        return httpx.get(f"{self.api_url}/healthz", timeout=2.0).status_code == 200
