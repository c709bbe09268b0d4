"""A farm for tests: the API served over real HTTP in this process, real worker processes.

Registered for every test module by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import uvicorn

from producer.api import create_app
from producer.processes import ManagedProcess, free_port
from producer.services import S3Service
from shared.config import Settings
from shared.keys import Keys
from shared.ledger.workers import live_workers

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FarmEnv:
    """Settings of a test farm, and the same as environment variables for child processes."""

    settings: Settings
    env: dict[str, str]
    log_dir: Path
    workers: list[ManagedProcess] = field(default_factory=list)

    def start_worker(
        self, *, extra_env: dict[str, str] | None = None, name: str | None = None
    ) -> ManagedProcess:
        name = name or f"worker-{len(self.workers)}"
        argv = [sys.executable, "-m", "producer", "worker", "--device", "cpu", "--loglevel", "INFO"]
        process = ManagedProcess(
            name, argv, log_dir=self.log_dir, env={**self.env, **(extra_env or {})}, cwd=ROOT
        )
        process.start()
        self.workers.append(process)
        return process

    def wait_for_workers(self, count: int, timeout_s: float = 120.0) -> None:
        client = redis.Redis.from_url(self.settings.redis_url)
        deadline = time.monotonic() + timeout_s
        try:
            while len(live_workers(client, Keys())) < count:
                for process in self.workers:
                    if not process.is_running():
                        raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{count} workers not live after {timeout_s}s")
                time.sleep(0.2)
        finally:
            client.close()

    def stop_workers(self) -> None:
        for process in self.workers:
            if process.is_running():
                process.stop(timeout_s=20)


@pytest.fixture
def farm_env(
    redis_url: str,
    s3_service: S3Service,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[FarmEnv]:
    """Settings for a farm on the session's Redis and S3 store, with the tiny model as `tiny`."""
    prefix = f"t{int(time.time() * 1000)}"
    env = {
        **os.environ,
        "SDFARM_REDIS_URL": redis_url,
        "SDFARM_STORAGE_URL": f"s3://{s3_service.bucket}/{prefix}",
        "SDFARM_S3_ENDPOINT_URL": s3_service.endpoint_url,
        "SDFARM_MODELS": f"tiny={tiny_model_dir}",
        "SDFARM_LEASE_S": "10",
        # Tests put operator-provided init images here (jobs may name no other s3:// keys).
        "SDFARM_INIT_IMAGE_PREFIXES": f"s3://{s3_service.bucket}/inputs/",
        "SDFARM_WORKER_TTL_S": "6",
        "OMP_NUM_THREADS": "1",  # several worker processes share 2 cores: one thread each
        "AWS_ACCESS_KEY_ID": s3_service.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_service.secret_key,
        "AWS_DEFAULT_REGION": s3_service.region,
    }
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    settings = Settings(
        redis_url=redis_url,
        storage_url=env["SDFARM_STORAGE_URL"],
        s3_endpoint_url=s3_service.endpoint_url,
        models={"tiny": str(tiny_model_dir)},
        lease_s=10,
        worker_ttl_s=6,
        init_image_prefixes=[env["SDFARM_INIT_IMAGE_PREFIXES"]],
    )
    farm = FarmEnv(settings=settings, env=env, log_dir=tmp_path / "logs")
    yield farm
    farm.stop_workers()


class _ThreadedServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own handlers
        pass


@pytest.fixture
def serve_api() -> Iterator[Callable[[Settings], str]]:
    """Start the API (with its dispatcher) over real HTTP on a free port; returns its URL."""
    servers: list[tuple[_ThreadedServer, threading.Thread]] = []

    def start(settings: Settings) -> str:
        port = free_port()
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_level="warning"
        )
        server = _ThreadedServer(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("API did not start")
            time.sleep(0.05)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
