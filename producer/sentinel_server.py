"""A local Redis Sentinel group: replicas of a running master and the sentinels that watch them.

For the tests and the fault suite, which fail a master over on one machine: every process binds
to 127.0.0.1 on a free port and keeps its data, its log and (for a sentinel) the configuration
file it rewrites as it learns the group in one directory each. Production runs its own
sentinels; the farm only needs their addresses (`SDFARM_REDIS_SENTINELS`, shared/redis_client.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from producer.processes import ManagedProcess, free_port
from producer.redis_server import RedisService, redis_server_binary, redis_service
from shared.errors import ServiceStartError

__all__ = ["SentinelGroup", "start_sentinel_group"]

log = logging.getLogger(__name__)


@dataclass
class SentinelGroup:
    """A master's replicas and its sentinels; the master itself belongs to the caller."""

    master_name: str
    sentinel_ports: list[int]
    password: str | None = None  # the sentinels' own (`requirepass`)
    replicas: list[RedisService] = field(default_factory=list)
    sentinels: list[ManagedProcess] = field(default_factory=list)
    master_url: str | None = None  # the master the group was formed around

    @property
    def addresses(self) -> str:
        """The sentinels as SDFARM_REDIS_SENTINELS spells them."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def processes(self) -> list[ManagedProcess]:
        """Replicas first, then sentinels: the order to start them in."""
        return [r.process for r in self.replicas] + self.sentinels

    def master_address(self) -> tuple[str, int] | None:
        """Where the first sentinel that answers says the master is now."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), self._client(port) as client:
                found = client.sentinel_get_master_addr_by_name(self.master_name)
                if found:
                    host = found[0].decode() if isinstance(found[0], bytes) else str(found[0])
                    return host, int(found[1])
        return None

    def wait_watching(self, timeout_s: float = 30.0) -> None:
        """Wait until every sentinel knows every other one and every replica, and each replica
        has synced: only then can the group agree on a failover."""
        deadline = time.monotonic() + timeout_s
        while not self._watching():
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.log_tail(10)}" for p in self.processes())
                raise ServiceStartError(f"sentinel group not formed in {timeout_s:.0f} s\n{tails}")
            time.sleep(0.1)

    def ping(self, port: int) -> bool:
        """Whether the sentinel on `port` answers (its readiness probe)."""
        with self._client(port) as client:
            return bool(client.ping())

    def stop(self) -> None:
        for process in reversed(self.processes()):
            process.stop()

    def _watching(self) -> bool:
        try:
            for port in self.sentinel_ports:
                with self._client(port) as client:
                    state = client.sentinel_master(self.master_name)
                if state["num-other-sentinels"] < len(self.sentinel_ports) - 1:
                    return False
                if state["num-slaves"] < len(self.replicas):
                    return False
            for replica in self.replicas:
                with redis.Redis.from_url(replica.url) as client:
                    if client.info("replication").get("master_link_status") != "up":
                        return False
            if self.master_url is not None and not self._master_streams():
                return False
        except redis.RedisError:
            return False
        return True

    def _master_streams(self) -> bool:
        """Whether a write to the master reaches every replica. A replica's link is "up" once it
        has loaded the master's data, but after a diskless sync the master streams to it only
        from the replica's first REPLCONF ACK, up to a second later: a write in between reaches
        the replica late, and a master killed then loses it. So a probe write is WAITed for."""
        assert self.master_url is not None
        with redis.Redis.from_url(self.master_url) as client:
            pipe = client.pipeline(transaction=False)
            pipe.set("sentinel-group:probe", "1", px=1000)  # gone a second later
            pipe.execute_command("WAIT", len(self.replicas), 100)  # type: ignore[no-untyped-call]
            acknowledged = int(pipe.execute()[-1])
        return acknowledged >= len(self.replicas)

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(
            "127.0.0.1", port, password=self.password, socket_timeout=1, socket_connect_timeout=1
        )


def start_sentinel_group(
    data_dir: Path,
    master: RedisService,
    *,
    master_name: str = "sdfarm",
    replicas: int = 1,
    sentinels: int = 3,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
    password: str | None = None,
    timeout_s: float = 30.0,
) -> SentinelGroup:
    """Start `replicas` replicas of `master` and `sentinels` sentinels watching it (a majority
    is the quorum), and wait until the group is formed. `password` is the sentinels' own; the
    replicas take the master's (`master.password`) for clients and for replication."""
    data_dir = Path(data_dir).resolve()
    ports = [free_port() for _ in range(sentinels)]
    group = SentinelGroup(master_name, ports, password, master_url=master.url)
    ids = [secrets.token_hex(20) for _ in group.sentinel_ports]  # each sentinel's run id
    auth = ["--masterauth", master.password] if master.password else []
    try:
        # The master waits 5 s (Redis 7's default) for more replicas before it streams its data
        # to the first; here they all start at once.
        with redis.Redis.from_url(master.url) as client:
            client.config_set("repl-diskless-sync-delay", 0)
        for index in range(replicas):
            replica = redis_service(
                data_dir / f"replica-{index}",
                password=master.password,
                extra_args=["--replicaof", master.host, str(master.port), *auth],
            )
            group.replicas.append(replica)
            replica.start(timeout_s)
        for index, port in enumerate(group.sentinel_ports):
            conf = _sentinel_conf(
                data_dir / f"sentinel-{index}",
                port,
                master,
                master_name=master_name,
                quorum=sentinels // 2 + 1,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                password=password,
                peers=[
                    (peer_port, peer_id)
                    for peer_port, peer_id in zip(group.sentinel_ports, ids, strict=True)
                    if peer_port != port
                ],
                my_id=ids[index],
                replicas=[r.port for r in group.replicas],
            )
            process = ManagedProcess(
                f"sentinel-{index}",
                [redis_server_binary(), str(conf), "--sentinel"],
                log_dir=conf.parent,
                ready=functools.partial(group.ping, port),
            )
            group.sentinels.append(process)
            process.start()
            process.wait_ready(timeout_s)
        group.wait_watching(timeout_s)
    except BaseException:
        group.stop()
        raise
    return group


def _sentinel_conf(
    data_dir: Path,
    port: int,
    master: RedisService,
    *,
    master_name: str,
    quorum: int,
    down_after_ms: int,
    failover_timeout_ms: int,
    password: str | None,
    peers: list[tuple[int, str]],
    my_id: str,
    replicas: list[int],
) -> Path:
    """A sentinel's configuration file (which it rewrites as it learns the group). It names
    the other sentinels and the replicas, which a sentinel would otherwise take a few seconds
    of hello messages to find."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {data_dir}",
        "daemonize no",
        f"sentinel monitor {master_name} {master.host} {master.port} {quorum}",
        f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
        f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
        f"sentinel parallel-syncs {master_name} 1",
        f"sentinel myid {my_id}",
        *(f"sentinel known-sentinel {master_name} 127.0.0.1 {p} {i}" for p, i in peers),
        *(f"sentinel known-replica {master_name} 127.0.0.1 {p}" for p in replicas),
    ]
    if master.password:
        lines.append(f"sentinel auth-pass {master_name} {master.password}")
    if password:
        lines.append(f"requirepass {password}")  # other sentinels authenticate with it too
    path = data_dir / "sentinel.conf"
    path.write_text("\n".join(lines) + "\n")
    return path
