"""The whole farm on this machine, timed: API, Redis, one worker process, SeaweedFS.

A local farm (producer/local.py) is started with no worker; one worker process is then started
by hand, so that the bench knows its pid (for its peak RSS) and can stop it before measuring
what queued jobs cost Redis. The worker is warmed up on one chunk first (model load, first-call
costs), as a farm that has been running would be.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from bench.direct import Job
from producer.client import FarmClient
from producer.local import LocalFarm
from producer.processes import ManagedProcess
from shared.keys import Keys
from shared.ledger import Ledger

__all__ = ["measure_farm"]

log = logging.getLogger(__name__)

# How often the bench asks whether a batch is done. The time itself comes from the jobs' own
# `finished_at`, so polling only has to notice the end; slow, it steals no CPU from the worker.
POLL_S = 0.5
RENDER_TIMEOUT_S = 1800.0


def _wait_done(client: FarmClient, batch_id: str, total: int) -> None:
    """Poll until every job of the batch ended; raise unless all succeeded."""
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while time.monotonic() < deadline:
        counts = client.batch(batch_id)["counts"]
        ended = counts["succeeded"] + counts["failed"] + counts["cancelled"]
        if ended == total:
            if counts["succeeded"] != total:
                raise RuntimeError(f"batch {batch_id}: not every job succeeded: {counts}")
            return
        time.sleep(POLL_S)
    raise TimeoutError(f"batch {batch_id} not done after {RENDER_TIMEOUT_S:.0f} s")


def _submit(client: FarmClient, jobs: Sequence[Job]) -> dict[str, Any]:
    return client.submit([job.farm_spec() for job in jobs])


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _overhead(ledger: Ledger, job_ids: list[str]) -> dict[str, float]:
    """The worker's wall time on the batch, and the share of it outside the three models."""
    records = [r for r in ledger.jobs(job_ids) if r is not None]
    started = min(float(r["started_at"]) for r in records)
    finished = max(float(r["finished_at"]) for r in records)  # the last object stored
    # Every job of a chunk carries the chunk's timings: a job's share is 1/rows of them.
    model_s = sum(
        (t["text_encoder"] + t["unet"] + t["vae"]) / t["batch_rows"]
        for t in (r["timings"] for r in records)
    )
    rows = [r["timings"]["batch_rows"] for r in records]
    wall = finished - started
    return {
        "last_finished_at": finished,
        "worker_wall_s": wall,
        "model_s": model_s,
        "overhead_share": 1 - model_s / wall,
        "mean_rows_per_pass": sum(rows) / len(rows),
    }


def _redis_bytes_per_job(client: FarmClient, r: redis.Redis, jobs: Sequence[Job]) -> dict[str, Any]:
    """Bytes of Redis memory per queued job (INFO used_memory), with no worker to take them."""
    before = int(r.info("memory")["used_memory"])
    submitted = _submit(client, jobs)
    time.sleep(1.0)  # let the dispatcher do what it does with queued work (it is counted too)
    after = int(r.info("memory")["used_memory"])
    sample = r.memory_usage(Keys().job(submitted["job_ids"][0])) or 0
    return {
        "queued_jobs": len(jobs),
        "redis_bytes_per_queued_job": (after - before) / len(jobs),
        "job_record_bytes": int(sample),
    }


def measure_farm(  # noqa: PLR0917 - one caller, every argument named there
    state_dir: Path,
    model_dir: Path,
    jobs: Sequence[Job],
    warm_up: Sequence[Job],
    memory_jobs: Sequence[Job],
    max_batch: int,
    repeats: int = 1,
) -> dict[str, Any]:
    """Images/s of the whole farm on `jobs` (best of `repeats`), its overhead, RSS, Redis/job."""
    env = {"SDFARM_MAX_BATCH": str(max_batch)}
    farm = LocalFarm(state_dir=state_dir, workers=0, models={"tiny": str(model_dir)}, extra_env=env)
    with farm:
        argv = [sys.executable, "-m", "producer", "worker", "--device", "cpu"]
        argv += ["--model", f"tiny={model_dir}"]
        worker = ManagedProcess("bench-worker", argv, log_dir=farm.log_dir, env=farm.env)
        worker.start()
        r = redis.Redis.from_url(farm.redis.url)
        ledger = Ledger(r, status_ttl_s=3600, lease_s=60)
        try:
            with FarmClient(farm.api_url, farm.api_key) as client:
                first = _submit(client, warm_up)
                _wait_done(client, first["batch_id"], len(warm_up))

                result: dict[str, Any] = {"farm_s": float("inf")}
                for _ in range(repeats):
                    started = time.time()  # the clock the worker stamps `finished_at` with
                    submitted = _submit(client, jobs)
                    _wait_done(client, submitted["batch_id"], len(jobs))
                    run = _overhead(ledger, submitted["job_ids"])
                    farm_s = run.pop("last_finished_at") - started
                    if farm_s < result["farm_s"]:
                        result = {"farm_s": farm_s, **run}
                result["farm_images_per_s"] = len(jobs) / result["farm_s"]
                result["worker_peak_rss_mib"] = _peak_rss_mib(worker.pid)
                worker.stop(30)  # drains its output pipeline; nothing may render what follows
                result |= _redis_bytes_per_job(client, r, memory_jobs)
        finally:
            if worker.is_running():
                worker.stop(30)
            r.close()
    return result
