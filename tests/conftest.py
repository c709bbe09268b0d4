"""Fixtures shared by the whole suite: a real Redis and a real S3 store (SeaweedFS).

Each service is started once per test session on a free port in a temporary directory. On a
laptop without the binary the tests that need it are skipped, saying what to install; in CI
(`CI` set) a missing binary fails the run instead, so a broken image never passes by skipping.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator

import pytest
import redis

from producer.services import (
    RedisService,
    S3Service,
    redis_server_binary,
    start_redis,
    start_seaweedfs,
    weed_binary,
)
from shared.errors import ServiceStartError

# Fixtures kept in their own modules, registered here so every test module can use them.
pytest_plugins = ["tests.fixtures_model", "tests.fixtures_farm", "tests.fixtures_api"]


def _running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _binary_or_skip(find: Callable[[], str]) -> str:
    try:
        return find()
    except ServiceStartError as e:
        if _running_in_ci():
            pytest.fail(f"{e} (CI is set, so a missing service fails instead of skipping)")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def redis_server_bin() -> str:
    """The redis-server binary the suite uses (skips or fails when there is none)."""
    return _binary_or_skip(redis_server_binary)


@pytest.fixture(scope="session")
def weed_bin() -> str:
    """The SeaweedFS binary the suite uses (skips or fails when there is none)."""
    return _binary_or_skip(weed_binary)


@pytest.fixture(scope="session")
def redis_service(
    redis_server_bin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisService]:
    """A private redis-server with AOF on, as in production, for the whole session."""
    service = start_redis(tmp_path_factory.mktemp("redis"), appendonly=True)
    yield service
    service.stop()


@pytest.fixture
def redis_url(redis_service: RedisService) -> str:
    """The session Redis, emptied before the test (and started again if a test stopped it)."""
    if not redis_service.process.is_running():
        redis_service.start()
    client = redis.Redis.from_url(redis_service.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_service.url


@pytest.fixture(scope="session")
def s3_service(weed_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    """A private SeaweedFS with a random bucket and random credentials, for the whole session."""
    service = start_seaweedfs(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key=f"sdfarm{secrets.token_hex(8)}",
        secret_key=secrets.token_urlsafe(30),
        bucket=f"sdfarm-test-{secrets.token_hex(4)}",
    )
    yield service
    service.stop()
