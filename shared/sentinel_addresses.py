"""`SDFARM_REDIS_SENTINELS`: the Redis Sentinel addresses the farm asks where its master is."""

from __future__ import annotations

__all__ = ["parse_sentinels"]


def parse_sentinels(text: str) -> list[tuple[str, int]]:
    """Parse `host:port,host:port,...` (IPv6 as `[addr]:port`), refusing a malformed entry."""
    sentinels: list[tuple[str, int]] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        host = host.strip().removeprefix("[").removesuffix("]")
        if not sep or not host or not port.strip().isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"SDFARM_REDIS_SENTINELS entry {entry!r} must look like HOST:PORT with a port "
                "from 1 to 65535, for example `sentinel-1:26379,sentinel-2:26379`"
            )
        sentinels.append((host, int(port)))
    return sentinels
