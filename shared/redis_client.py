"""The farm's Redis clients, built in one place with explicit timeouts.

Every process of the farm (the API, `sdfarm dispatcher`, the worker, the CLI) connects here, so
none of them waits for ever on a Redis that stopped answering: a command fails after
`redis_socket_timeout_s`, a connect after `redis_connect_timeout_s`, and an idle connection is
checked before reuse. The socket timeout must outlast the farm's blocking commands (BLPOP of the
dispatcher's wake list, BLMOVE of the finisher's ended batches): those block for at most
`BLOCKING_CALL_MAX_S`, and the setting cannot be set below 2 s.
"""

from __future__ import annotations

import redis

from shared.config import Settings

__all__ = ["BLOCKING_CALL_MAX_S", "connect"]

# The longest a farm process blocks in one Redis command (the finisher's BLMOVE, 0.5 s; the
# dispatcher's BLPOP, 0.25 s; Celery's BRPOP, 1 s): `Settings.redis_socket_timeout_s` >= 2 s.
BLOCKING_CALL_MAX_S = 1.0


def connect(settings: Settings, url: str | None = None) -> redis.Redis:
    """A client of `url` (default: `settings.redis_url`) with the farm's timeouts."""
    return redis.Redis.from_url(
        url or settings.redis_url,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        health_check_interval=settings.redis_health_check_interval_s,
        socket_keepalive=True,
    )
