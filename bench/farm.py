"""The whole farm on this machine, timed: API, Redis, one worker process, SeaweedFS.

`BenchFarm` starts a local farm (producer/local.py) with no worker, then one worker process by
hand, so that the bench knows its pid (for its peak RSS) and can stop it before measuring what
queued jobs cost Redis. It stays up for the whole bench, so that runs of the farm and of
diffusers can take turns (`bench/run.py`) and a machine whose speed drifts skews neither side.
The worker is warmed up on one chunk first (model load, first-call costs), as a farm that has
been running would be.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import redis

from bench.direct import Job
from producer.client import FarmClient
from producer.client_types import Submitted
from producer.local import LocalFarm
from producer.processes import ManagedProcess
from shared.keys import Keys
from shared.ledger import Ledger

__all__ = ["BenchFarm"]

log = logging.getLogger(__name__)

# How often the bench asks whether a batch is done. The time itself comes from the jobs' own
# `finished_at`, so polling only has to notice the end; slow, it steals no CPU from the worker.
POLL_S = 0.5
RENDER_TIMEOUT_S = 1800.0
READY_POLL_S = 0.1
CLOCK_TICKS = 100  # /proc's utime and stime are in USER_HZ, 100 on Linux


class BenchFarm:
    """A local farm and one worker process, started once; `run(jobs)` times one batch."""

    def __init__(
        self,
        state_dir: Path,
        model_dir: Path,
        max_batch: int,
        storage: str = "s3",
        *,
        device: str = "cpu",
        model_name: str = "tiny",
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        env = {"SDFARM_MAX_BATCH": str(max_batch), **(extra_env or {})}
        self.model_dir = model_dir
        self.model_name = model_name
        self.device = device
        self.farm = LocalFarm(
            state_dir=state_dir,
            workers=0,
            models={model_name: str(model_dir)},
            storage=storage,
            extra_env=env,
        )

    def __enter__(self) -> Self:
        self.farm.start()
        try:
            self.redis = redis.Redis.from_url(self.farm.redis.url)
            self.ledger = Ledger(self.redis, status_ttl_s=3600, lease_s=60)
            self.client = FarmClient(self.farm.api_url, self.farm.api_key)
            self.ready_s = self.start_worker()
        except BaseException:
            self.farm.stop()
            raise
        return self

    def start_worker(self, *, compile_unet: bool = False) -> float:
        """Start the worker process; seconds until it is ready (its heartbeat says it serves,
        published once its models are loaded and, compiled, warmed up)."""
        argv = [sys.executable, "-m", "producer", "worker", "--device", self.device]
        argv += ["--model", f"{self.model_name}={self.model_dir}"]
        if compile_unet:
            argv.append("--compile")
        started = time.monotonic()
        self.worker = ManagedProcess(
            "bench-worker", argv, log_dir=self.farm.log_dir, env=self.farm.env
        )
        self.worker.start()
        while not any(w.get("pid") == self.worker.pid for w in self.ledger.workers.live()):
            # the heartbeat's pid: `sdfarm worker` without --gpus runs in the process started
            if not self.worker.is_running():
                raise RuntimeError(f"the bench worker exited; see {self.worker.log_path}")
            if time.monotonic() - started > RENDER_TIMEOUT_S:
                raise TimeoutError(f"the bench worker not ready after {RENDER_TIMEOUT_S:.0f} s")
            time.sleep(READY_POLL_S)
        return time.monotonic() - started

    def stop_worker(self) -> None:
        if self.worker.is_running():
            self.worker.stop(30)

    def __exit__(self, *exc: object) -> None:
        try:
            self.client.close()
            self.stop_worker()
            self.redis.close()
        finally:
            self.farm.stop()

    def warm_up(self, jobs: Sequence[Job]) -> None:
        """Render `jobs` untimed: the worker loads its model and pays its first-call costs."""
        submitted = self._submit(jobs)
        self._wait_done(submitted["batch_id"], len(jobs))

    def run(self, jobs: Sequence[Job]) -> dict[str, Any]:
        """One timed batch: seconds from the POST to the last object stored, the overhead, and
        the CPU seconds each process used meanwhile (until the bench saw the batch end)."""
        cpu_before = self.cpu_seconds()
        started = time.time()  # the clock the worker stamps `finished_at` with
        submitted = self._submit(jobs)
        self._wait_done(submitted["batch_id"], len(jobs))
        cpu = {k: v - cpu_before[k] for k, v in self.cpu_seconds().items()}
        run = self._overhead(submitted["job_ids"])
        farm_s = run.pop("last_finished_at") - started
        return {"farm_s": farm_s, "farm_images_per_s": len(jobs) / farm_s, **run, "cpu_s": cpu}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each of the farm's processes (user and system)."""
        processes = {"redis": self.farm.redis.process, "api": self.farm.api, "worker": self.worker}
        if self.farm.s3:
            processes["seaweedfs"] = self.farm.s3.process
        out = {}
        for name, process in processes.items():
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
        return out

    def finish(self, memory_jobs: Sequence[Job]) -> dict[str, Any]:
        """The worker's peak RSS; then, with the worker stopped, Redis bytes per queued job."""
        result: dict[str, Any] = {"worker_peak_rss_mib": _peak_rss_mib(self.worker.pid)}
        self.worker.stop(30)  # drains its output pipeline; nothing may render what follows
        before = int(self.redis.info("memory")["used_memory"])
        submitted = self._submit(memory_jobs)
        time.sleep(1.0)  # let the dispatcher do what it does with queued work (it is counted too)
        after = int(self.redis.info("memory")["used_memory"])
        sample = self.redis.memory_usage(Keys().job(submitted["job_ids"][0])) or 0
        return result | {
            "queued_jobs": len(memory_jobs),
            "redis_bytes_per_queued_job": (after - before) / len(memory_jobs),
            "job_record_bytes": int(sample),
        }

    def _submit(self, jobs: Sequence[Job]) -> Submitted:
        return self.client.submit([job.farm_spec() for job in jobs])

    def _wait_done(self, batch_id: str, total: int) -> None:
        """Poll until every job of the batch ended; raise unless all succeeded."""
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while time.monotonic() < deadline:
            counts = self.client.batch(batch_id)["counts"]
            ended = counts["succeeded"] + counts["failed"] + counts["cancelled"]
            if ended == total:
                if counts["succeeded"] != total:
                    raise RuntimeError(f"batch {batch_id}: not every job succeeded: {counts}")
                return
            time.sleep(POLL_S)
        raise TimeoutError(f"batch {batch_id} not done after {RENDER_TIMEOUT_S:.0f} s")

    def _overhead(self, job_ids: list[str]) -> dict[str, float]:
        """The worker's wall time on the batch, and the share of it outside the three models."""
        records = [r for r in self.ledger.jobs(job_ids) if r is not None]
        started = min(float(r["started_at"]) for r in records)
        finished = max(float(r["finished_at"]) for r in records)  # the last object stored
        # Every job of a chunk carries the chunk's timings: a job's share is 1/rows of them.
        model_s = sum(
            (t["text_encoder"] + t["unet"] + t["vae"]) / t["batch_rows"]
            for t in (r["timings"] for r in records)
        )
        rows = [r["timings"]["batch_rows"] for r in records]
        # Each pass's own model time, in the order they ran (a pass's jobs share its timings):
        # a slow run shows whether every pass was slower (a slower CPU) or one stalled.
        passes: dict[tuple[float, ...], float] = {}
        for r in records:
            t = r["timings"]
            key = (t["text_encoder"], t["unet"], t["vae"])
            passes[key] = min(passes.get(key, float("inf")), float(r["started_at"]))
        pass_model_s = [round(sum(key), 3) for key in sorted(passes, key=passes.__getitem__)]
        wall = finished - started
        return {
            "last_finished_at": finished,
            "worker_wall_s": wall,
            "model_s": model_s,
            "overhead_share": 1 - model_s / wall,
            "mean_rows_per_pass": sum(rows) / len(rows),
            "pass_model_s": pass_model_s,
        }


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
