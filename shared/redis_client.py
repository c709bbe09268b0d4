"""The farm's Redis clients, built in one place with explicit timeouts.

Every process of the farm (the API, `sdfarm dispatcher`, the worker, the CLI) connects here, so
none of them waits for ever on a Redis that stopped answering: a command fails after
`redis_socket_timeout_s`, a connect after `redis_connect_timeout_s`, and an idle connection is
checked before reuse. The socket timeout must outlast the farm's blocking commands (BLPOP of the
dispatcher's wake list, BLMOVE of the finisher's ended batches): those block for at most
`BLOCKING_CALL_MAX_S`, and the setting cannot be set below 2 s.

With `SDFARM_REDIS_SENTINELS` set, the client asks the sentinels where the master of
`SDFARM_REDIS_MASTER` is, and asks again whenever a connection to it fails: after a failover the
next connection goes to the promoted replica. SDFARM_REDIS_URL then gives only the master's
password (and user) and database number. Until the sentinels promote a replica (about their
`down-after-milliseconds` plus an election), commands fail with `redis.ConnectionError`, exactly
as they do while a lone Redis restarts, and every caller already survives that: the background
loops back off and retry, the API answers 503, a worker's jobs come back through their leases.
A master demoted to a replica answers writes with READONLY; that too is a connection error here.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelManagedConnection

from shared.config import Settings

__all__ = ["BLOCKING_CALL_MAX_S", "FailoverConnection", "connect", "master_auth", "sentinel"]

# The longest a farm process blocks in one Redis command (the finisher's BLMOVE, 0.5 s; the
# dispatcher's BLPOP, 0.25 s; Celery's BRPOP, 1 s): `Settings.redis_socket_timeout_s` >= 2 s.
BLOCKING_CALL_MAX_S = 1.0

# What Redis 6 puts in the error of a script whose write reached a replica (Redis 7 answers a
# plain READONLY, which redis-py's sentinel connection already treats as a failover).
_SCRIPT_READONLY = "-READONLY "


def connect(settings: Settings, url: str | None = None) -> redis.Redis:
    """A client of the farm's Redis with the farm's timeouts: of `url` when given, else of the
    sentinels' master when SDFARM_REDIS_SENTINELS is set, else of `settings.redis_url`."""
    if url is None and settings.redis_sentinels:
        client: redis.Redis = sentinel(settings).master_for(
            settings.redis_master,
            connection_class=FailoverConnection,
            **master_auth(settings),
            **_timeouts(settings),
        )
        return client
    return redis.Redis.from_url(url or settings.redis_url, **_timeouts(settings))


def sentinel(settings: Settings) -> Sentinel:
    """The sentinels of SDFARM_REDIS_SENTINELS, with their password and the farm's timeouts."""
    sentinel_kwargs: dict[str, Any] = {
        "password": settings.redis_sentinel_password,
        "socket_timeout": settings.redis_connect_timeout_s,  # a sentinel answers at once
        "socket_connect_timeout": settings.redis_connect_timeout_s,
    }
    return Sentinel(settings.redis_sentinels, sentinel_kwargs=sentinel_kwargs)


def master_auth(settings: Settings) -> dict[str, Any]:
    """The master's user, password and database, read from SDFARM_REDIS_URL."""
    parts = urlsplit(settings.redis_url)
    db = parts.path.strip("/") or "0"
    return {
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "db": int(db) if db.isdigit() else 0,
    }


def _timeouts(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "health_check_interval": settings.redis_health_check_interval_s,
        "socket_keepalive": True,
    }


class FailoverConnection(SentinelManagedConnection):
    """A connection to the sentinels' master that also reads a Lua script's READONLY (Redis 6
    wraps it in "Error running script") as the master having been demoted: it disconnects, so
    that the next connection asks the sentinels again, and raises `redis.ConnectionError`."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as e:
            if self.connection_pool.is_master and _SCRIPT_READONLY in str(e):
                self.disconnect()  # type: ignore[no-untyped-call]
                raise redis.ConnectionError(f"the master is now a replica: {e}") from e
            raise
