"""Start and stop the local service processes a farm needs: Redis and an S3 store (SeaweedFS).

Used by the test fixtures and by `sdfarm up`. Every service binds to 127.0.0.1 on a port chosen
here (or given), keeps its data and its log under one directory, and runs in its own process
group, so that Ctrl-C in a terminal reaches only `sdfarm up`, which then stops the children in
order, and so that stopping a service also stops anything it spawned.

The parts live beside this module, which gathers the names the tests and tools import:

    producer/service_base.py   `Service`: a managed process, its port and its data directory
    producer/redis_server.py   redis-server: finding it, `RedisService`, `start_redis`
    producer/seaweedfs.py      SeaweedFS: finding `weed`, `S3Service`, `start_seaweedfs`
"""

from __future__ import annotations

import logging

from producer.redis_server import RedisService, redis_server_binary, start_redis
from producer.seaweedfs import S3Service, start_seaweedfs, weed_binary

__all__ = [
    "RedisService",
    "S3Service",
    "redis_server_binary",
    "start_redis",
    "start_seaweedfs",
    "weed_binary",
]

log = logging.getLogger(__name__)
