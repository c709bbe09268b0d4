"""Dispatch and leases, a part of `Ledger` kept in a file of its own: taking chunks by the
dispatch policy, renewing the leases of running jobs, and finding the work the broker or a worker
lost. Every time here is Redis's (`server_time`, or `TIME` inside the scripts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import redis
from redis.commands.core import Script

from shared.keys import Keys
from shared.keys import text as _s
from shared.ledger.pending import Chunk, Take, pending_count, take_chunk

__all__ = ["Leases"]


class Leases:
    """Chunks out, leases renewed, lost work found (for `Ledger`, which builds these)."""

    redis: redis.Redis
    keys: Keys
    lease_s: float
    _take_chunk: Script
    _renew: Script

    def server_time(self) -> float:
        """Redis's clock, in seconds: the one clock leases and waits are judged by."""
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def pending_models(self) -> list[str]:
        return sorted(_s(m) for m in self.redis.smembers(self.keys.pending_models()))

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting in each model's pending lanes (cancelled ones count until skipped)."""
        return {
            model: pending_count(self.redis, self.keys, model) for model in self.pending_models()
        }

    def take(
        self,
        model: str,
        max_batch: int,
        *,
        wait_s: float = 0.0,
        weights: Mapping[str, float] | None = None,
    ) -> Take:
        """Take the next chunk for `model` by the dispatch policy (`shared.ledger.pending`):
        tenants by `weights` (a tenant not named weighs 1), then their batches in turn.

        A group of fewer than `max_batch` jobs is held until its oldest job has waited `wait_s`;
        the result then says when it is due instead.
        """
        return take_chunk(self._take_chunk, self.keys, model, max_batch, wait_s, weights=weights)

    def take_chunk(self, model: str, max_batch: int) -> Chunk | None:
        """Take up to `max_batch` compatible queued jobs for `model` now, holding nothing back."""
        return self.take(model, max_batch).chunk

    def renew_leases(
        self, worker: str, job_ids: Sequence[str], progress: tuple[int, int] | None = None
    ) -> set[str]:
        """Extend the leases `worker` holds for `lease_s` from Redis's now, write progress;
        return the ids whose cancel was requested."""
        if not job_ids:
            return set()
        step, steps = progress if progress else ("", "")
        args = [self.keys.prefix, worker, repr(float(self.lease_s)), step, steps, *job_ids]
        return {_s(v) for v in self._renew(args=args)}

    def expired_leases(self, now: float | None = None, limit: int = 1000) -> list[str]:
        """Running jobs whose lease ended before `now` (by default Redis's now)."""
        until = self.server_time() if now is None else now
        return [
            _s(v) for v in self.redis.zrangebyscore(self.keys.leases(), "-inf", until, 0, limit)
        ]

    def stale_inflight(self, older_than_s: float, limit: int = 1000) -> list[str]:
        """Jobs sent to a queue more than `older_than_s` ago (Redis's clock) and not started."""
        until = self.server_time() - older_than_s
        return [
            _s(v) for v in self.redis.zrangebyscore(self.keys.inflight(), "-inf", until, 0, limit)
        ]

    def forget_lease(self, job_id: str) -> None:
        """Drop a lease that no longer means anything (the job moved on, or its record expired)."""
        self.redis.zrem(self.keys.leases(), job_id)

    def forget_inflight(self, job_id: str) -> None:
        """Drop an in-flight entry whose job started, ended or expired since it was sent."""
        self.redis.zrem(self.keys.inflight(), job_id)
