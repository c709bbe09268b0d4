"""GPU claims in Redis: how replicas that all see every GPU end up with one GPU each.

Docker gives every replica of `docker compose up --scale worker=N` the same first GPU when a
replica reserves `count: 1`. So the compose files give each replica all of them, and
`sdfarm worker --gpus claim:1` takes one no other supervisor holds: a key per GPU UUID (unique
across machines) set only if absent, with a TTL the supervisor renews while it runs. A replica that
dies loses its claim after `ttl_s`; a replica with no GPU left waits for one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis

from shared.config import Settings
from shared.keys import Keys
from shared.ledger.claims import gpu_claim
from shared.redis_client import connect
from worker.gpus import gpu_uuids

__all__ = ["GpuClaims", "claim_gpus"]

log = logging.getLogger(__name__)


@dataclass
class GpuClaims:
    """The GPUs one supervisor holds, by UUID."""

    client: redis.Redis
    keys: Keys
    owner: str
    ttl_s: float = 30.0
    held: list[str] = field(default_factory=list)

    def claim(self, candidates: Sequence[str], count: int) -> list[str]:
        """Claim free GPUs among `candidates` until `count` are held; return those held."""
        for gpu in candidates:
            if len(self.held) >= count:
                break
            if gpu not in self.held and gpu_claim(self.client, self.keys, gpu).hold(
                self.owner, self.ttl_s
            ):
                self.held.append(gpu)
                log.info("supervisor %s: claimed GPU %s", self.owner, gpu)
        return list(self.held)

    def wait_for(
        self, candidates: Sequence[str], count: int, stop: threading.Event, retry_s: float = 5.0
    ) -> list[str]:
        """Claim until `count` are held or `stop` is set; other replicas may hold the rest."""
        while len(self.claim(candidates, count)) < count:
            log.warning(
                "supervisor %s: %d of %d GPUs here are claimed by other workers; waiting for one",
                self.owner,
                len(candidates) - len(self.held),
                len(candidates),
            )
            if stop.wait(retry_s):
                break
        return list(self.held)

    def renew(self) -> None:
        """Extend every claim held; a claim lost meanwhile (Redis was down) is taken again."""
        for gpu in self.held:
            claim = gpu_claim(self.client, self.keys, gpu)
            try:
                if not claim.hold(self.owner, self.ttl_s):
                    log.error(
                        "supervisor %s: GPU %s is now claimed by %s; two workers share it",
                        self.owner,
                        gpu,
                        claim.holder(),
                    )
            except redis.RedisError as e:
                log.warning("supervisor %s: could not renew GPU %s: %s", self.owner, gpu, e)

    def release(self) -> None:
        for gpu in self.held:
            try:
                gpu_claim(self.client, self.keys, gpu).release(self.owner)
            except redis.RedisError as e:  # it expires on its own
                log.warning("supervisor %s: could not release GPU %s: %s", self.owner, gpu, e)
        self.held.clear()


def claim_gpus(settings: Settings, count: int, env: Mapping[str, str]) -> tuple[str, GpuClaims]:
    """`--gpus claim:N`: wait for N free GPUs of this machine; return them as `--gpus` ids."""
    candidates = gpu_uuids(env)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    claims = GpuClaims(connect(settings), Keys(), owner)
    # SIGTERM while waiting ends the process the default way: nothing runs yet, claims expire.
    held = claims.wait_for(candidates, count, threading.Event())
    return ",".join(held), claims
