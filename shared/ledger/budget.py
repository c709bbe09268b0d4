"""What a batch will cost in Redis, and whether the ledger can afford it before a byte is written.

The ledger's budget is the smaller of `ledger_max_bytes` (when set) and Redis's `maxmemory` less
a headroom (when Redis has one); with neither there is no budget. What the ledger holds now is
Redis's `used_memory` (the ledger, the broker's few messages and Redis's own ~1 MB). Both are
read from one `INFO memory`, which managed Redis services allow where `CONFIG GET` is often
renamed away, and kept for `_FRESH_S`.

A batch that alone is over the whole budget can never be written: `BatchTooLarge` (HTTP 413).
One that fits the budget but not the room left by other work: `LedgerFull` (HTTP 507).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from shared.errors import BatchTooLarge, LedgerFull
from shared.keys import Keys

__all__ = ["BATCH_OVERHEAD_BYTES", "JOB_OVERHEAD_BYTES", "Budget", "Room", "estimate_bytes"]

# What a job costs beyond the lengths of its spec JSON, route, compat key and id (those are
# counted exactly): its hash (9 fields, hashtable-encoded because the spec is longer than
# `hash-max-listpack-value`: a dict entry and two strings per field, their names, the fixed
# values), its entries in Redis's key and expiry tables, and its id once more in the batch's job
# list and in its pending lane. Calibrated on Redis 7.0 (jemalloc) against the sum of
# `MEMORY USAGE key SAMPLES 0` over every key a written batch holds: estimate / usage was 1.01
# for 1,000 jobs with 451-byte specs (1,384 bytes a job), 0.98 with 641-byte specs, 1.06 for
# 100 jobs with 2.4 KB specs, 1.03 for 3,000 jobs with a 37 KB base64 init image each (41.8 KB
# a job: jemalloc rounds such a string up to its size class, hence `_ROUNDING`), 1.13 for 10
# jobs (the batch's own keys dominate). tests/test_ledger_budget.py keeps it within 30 %.
JOB_OVERHEAD_BYTES = 800
BATCH_OVERHEAD_BYTES = 4096  # the batch record, its list and zset entries, one lane's keys
LANE_OVERHEAD_BYTES = 1024  # each further compat key: its pending list, zset entries, since
_ROUNDING = 8  # big strings are rounded up to jemalloc's size classes: up to 1/8 more (4 a 2x)
_FRESH_S = 1.0  # INFO memory is read at most this often; accepted batches are added meanwhile


def estimate_bytes(text_bytes: int, jobs: int, lanes: int, meta: Mapping[str, str] | None) -> int:
    """Bytes a batch will take in Redis: `text_bytes` is the sum over its jobs of the lengths
    of their spec JSON, route, compat key and twice their id; `lanes` its compat keys."""
    meta_bytes = sum(len(k) + len(v) for k, v in (meta or {}).items())
    per_batch = BATCH_OVERHEAD_BYTES + LANE_OVERHEAD_BYTES * max(0, lanes - 1) + meta_bytes
    return text_bytes + text_bytes // _ROUNDING + jobs * JOB_OVERHEAD_BYTES + per_batch


@dataclass(frozen=True)
class Room:
    """The ledger's budget and what Redis holds now, in bytes; `source` names the limit."""

    limit_bytes: int
    used_bytes: int
    source: str

    @property
    def free_bytes(self) -> int:
        return max(0, self.limit_bytes - self.used_bytes)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class Budget:
    """Whether the ledger can take a batch of a given size; `Ledger.budget`."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._read_at = -_FRESH_S
        self._used = 0
        self._maxmemory = 0

    def room(self, *, max_bytes: int, headroom: float) -> Room | None:
        """The budget (`max_bytes`, or 0 for none; Redis's maxmemory less `headroom`, a
        fraction) and what is used of it; None when there is no limit at all."""
        if time.monotonic() - self._read_at > _FRESH_S:
            info = self.client.info("memory")
            self._used, self._maxmemory = int(info["used_memory"]), int(info.get("maxmemory", 0))
            self._read_at = time.monotonic()
        limits = []
        if max_bytes:
            limits.append((max_bytes, "SDFARM_LEDGER_MAX_BYTES"))
        if self._maxmemory:
            kept = int(self._maxmemory * (1 - headroom))
            source = f"Redis maxmemory {_mb(self._maxmemory)} less {headroom:.0%} headroom"
            limits.append((kept, source))
        if not limits:
            return None
        limit, source = min(limits)
        return Room(limit_bytes=limit, used_bytes=self._used, source=source)

    def check(self, need_bytes: int, jobs: int, *, max_bytes: int, headroom: float) -> None:
        """Refuse a batch of `jobs` jobs that needs `need_bytes`: BatchTooLarge when it alone is
        over the budget, LedgerFull when the room left is too small; else count it as spent."""
        room = self.room(max_bytes=max_bytes, headroom=headroom)
        if room is None:
            return
        if need_bytes > room.limit_bytes:
            per_job = max(1, (need_bytes - BATCH_OVERHEAD_BYTES) // max(1, jobs))
            fits = max(0, (room.limit_bytes - BATCH_OVERHEAD_BYTES) // per_job)
            raise BatchTooLarge(
                f"this batch of {jobs} jobs would take about {_mb(need_bytes)} in the job ledger, "
                f"more than its whole budget of {_mb(room.limit_bytes)} ({room.source}); send at "
                f"most {fits} such jobs a batch, or make each smaller (an init image in every "
                "job is stored with every job: upload it and pass its s3:// key instead)",
                [{"job": None, "field": "jobs", "message": "over the ledger's budget"}],
            )
        if need_bytes > room.free_bytes:
            raise LedgerFull(
                f"the job ledger has {_mb(room.free_bytes)} free of its budget of "
                f"{_mb(room.limit_bytes)} ({room.source}) and this batch of {jobs} jobs needs "
                f"about {_mb(need_bytes)}: try again when older records have expired, send a "
                "smaller batch, or give Redis more memory"
            )
        self._used += need_bytes  # until the next read, so batches accepted meanwhile add up

    def forget(self) -> None:
        """Read Redis again next time (after a write failed half way, or to test)."""
        self._read_at = -_FRESH_S
