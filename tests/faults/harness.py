"""A local farm to break, and the bookkeeping that says whether anything was lost or duplicated."""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer.client import FarmClient
from producer.local import LocalFarm
from shared.celery_app import model_queue
from shared.jobs import TERMINAL_STATES
from shared.keys import Keys
from shared.ledger import STATES, Ledger

log = logging.getLogger(__name__)

MODEL = "tiny"
TERMINAL = {state.value for state in TERMINAL_STATES}
# Jobs as small as the tiny model allows; rendering is not what is under test.
TINY = {"width": 64, "height": 64, "steps": 3}
# Long enough (a few seconds a chunk on a busy CPU) to be caught mid-chunk.
SLOW = {"width": 64, "height": 64, "steps": 100}

# The farm's settings: every timeout shortened so that recoveries take seconds. Workers of the
# fault suite honour the poison marker (a test hook, off everywhere else).
FARM_ENV = {
    "SDFARM_MAX_BATCH": "4",
    "SDFARM_LEASE_S": "4",  # a dead worker's jobs come back after this
    "SDFARM_DISPATCH_TIMEOUT_S": "10",  # a lost message is sent again after this
    "SDFARM_VISIBILITY_TIMEOUT_S": "6",  # Celery redelivers a chunk still running after this
    "SDFARM_WORKER_TTL_S": "6",
    "SDFARM_MAX_ATTEMPTS": "3",
    "SDFARM_STORAGE_BACKOFF_S": "0.25",
    "SDFARM_SHUTDOWN_GRACE_S": "30",
    "SDFARM_FAULT_INJECTION": "1",
    "SDFARM_BATCH_WAIT_MS": "0",  # send a chunk at once; holding small groups is not under test
    # Workers share a few cores here: one thread each, or OpenMP threads spinning against each
    # other make a 2 s chunk take minutes.
    "OMP_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class Size:
    """How big each scenario is: full size for `make faults`, sized down for `make test`."""

    jobs: int  # jobs in an ordinary scenario's batch
    storage_outage_s: float  # how long SeaweedFS stays down
    soak_jobs: int
    soak_restart_every: int  # a worker is restarted after this many more jobs finish
    timeout_s: float  # the longest any one wait may take


FULL = Size(jobs=40, storage_outage_s=20, soak_jobs=1000, soak_restart_every=200, timeout_s=600)
SMALL = Size(jobs=12, storage_outage_s=5, soak_jobs=100, soak_restart_every=30, timeout_s=300)


@dataclass
class Row:
    """One line of the fault table."""

    scenario: str
    submitted: int
    succeeded: int
    failed: int
    lost: int
    duplicated: int
    recovery_s: float | None
    counters_ok: bool
    missing_objects: int  # succeeded jobs whose object is not in the store
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What breaks the suite's promise; empty when the row is clean."""
        out = []
        if self.lost:
            out.append(f"{self.lost} lost")
        if self.duplicated:
            out.append(f"{self.duplicated} duplicated")
        if not self.counters_ok:
            out.append("counters do not add up")
        if self.missing_objects:
            out.append(f"{self.missing_objects} succeeded without an object")
        return out


class FaultFarm:
    """A started `LocalFarm` plus what the scenarios need to submit, watch, break and count."""

    def __init__(self, farm: LocalFarm, size: Size) -> None:
        self.farm = farm
        self.size = size
        self.redis = redis.Redis.from_url(farm.redis.url)
        self.ledger = Ledger(self.redis, status_ttl_s=24 * 3600, lease_s=4)
        self.keys = Keys()
        self.client = FarmClient(farm.api_url, farm.api_key, timeout_s=60)
        assert farm.s3 is not None, "the fault suite runs with S3 storage"
        self.s3 = farm.s3.client()

    @classmethod
    def start(
        cls, state_dir: Path, size: Size, *, workers: int = 2, model_dir: Path | None = None
    ) -> FaultFarm:
        models = {MODEL: str(model_dir)} if model_dir else None
        farm = LocalFarm(
            state_dir=state_dir, workers=workers, models=models, extra_env=FARM_ENV
        ).start()
        try:
            farm.wait_for_workers(size.timeout_s)
        except BaseException:
            farm.stop()
            raise
        return cls(farm, size)

    def stop(self) -> None:
        self.client.close()
        self.redis.close()
        self.farm.stop()

    # -- submitting and waiting -----------------------------------------------------------------

    def submit(
        self, count: int, spec: Mapping[str, Any], *, tag: str = ""
    ) -> tuple[str, list[str]]:
        """Submit `count` jobs with `spec` through the API; returns (batch id, job ids)."""
        return self.submit_prompts(
            [f"{tag} fault suite prompt {i}, a lighthouse" for i in range(count)], spec
        )

    def submit_prompts(self, prompts: list[str], spec: Mapping[str, Any]) -> tuple[str, list[str]]:
        body = self.client.submit(prompts=prompts, defaults=dict(spec))
        return body["batch_id"], list(body["job_ids"])

    def wait_until(
        self, check: Callable[[], Any], what: str, timeout_s: float | None = None
    ) -> Any:
        """Poll `check` until it returns something true; that value is returned."""
        deadline = time.monotonic() + (timeout_s or self.size.timeout_s)
        while True:
            try:
                value = check()
            except redis.ConnectionError:
                value = None  # Redis is restarting: ask again
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting for {what}\n{self.logs_tail()}")
            time.sleep(0.05)

    def wait_done(self, batch_id: str, timeout_s: float | None = None) -> dict[str, int]:
        """Wait until every job of the batch is terminal; the batch's counters."""

        def done() -> dict[str, int] | None:
            counts: dict[str, int] = self.ledger.batch(batch_id)["counts"]
            return counts if sum(counts[s] for s in TERMINAL) == sum(counts.values()) else None

        result: dict[str, int] = self.wait_until(done, f"batch {batch_id} to end", timeout_s)
        return result

    def jobs(self, job_ids: list[str]) -> list[dict[str, Any]]:
        return [record for record in self.ledger.jobs(job_ids) if record is not None]

    # -- workers ----------------------------------------------------------------------------------

    def worker_pid(self, index: int) -> int:
        return self.farm.workers[index].pid

    def running_on(self, index: int, job_ids: list[str]) -> list[str]:
        """The jobs among `job_ids` that worker `index` renders right now."""
        mark = f"-{self.worker_pid(index)}-"
        return [
            r["job_id"]
            for r in self.jobs(job_ids)
            if r["state"] == "running" and mark in r.get("worker", "")
        ]

    def wait_running_on(self, index: int, job_ids: list[str], min_step: int = 1) -> list[str]:
        """Wait until worker `index` is in the middle of a chunk of `job_ids` (past `min_step`)."""

        def busy() -> list[str]:
            mark = f"-{self.worker_pid(index)}-"
            running = [
                r
                for r in self.jobs(job_ids)
                if r["state"] == "running" and mark in r.get("worker", "")
            ]
            return [r["job_id"] for r in running if r.get("step", 0) >= min_step]

        ids: list[str] = self.wait_until(busy, f"worker-{index} to render a chunk")
        return ids

    def signal_worker(self, index: int, signum: signal.Signals) -> None:
        os.kill(self.worker_pid(index), signum)

    def wait_exit(self, index: int, timeout_s: float = 60) -> int:
        process = self.farm.workers[index]
        code: int = self.wait_until(
            lambda: process.returncode is not None and (process.returncode,),
            f"worker-{index} to exit",
            timeout_s,
        )[0]
        return code

    def restart_workers(self, extra_env: Mapping[str, str] | None = None) -> None:
        """Restart every worker (in parallel) with `extra_env` on top of the farm's settings."""
        for process in self.farm.workers:
            process.stop(30)
        for index in range(len(self.farm.workers)):
            self.farm.workers[index].env = {**self.farm.env, **(extra_env or {})}
            self.farm.workers[index].start()
        self.farm.wait_for_workers(self.size.timeout_s)

    def worker_rss_mib(self, index: int) -> float:
        """The worker's resident memory (VmRSS of /proc/PID/status), in MiB."""
        text = Path(f"/proc/{self.worker_pid(index)}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        assert match, f"no VmRSS in /proc/{self.worker_pid(index)}/status"
        return int(match.group(1)) / 1024

    def worker_log(self, index: int) -> str:
        return self.farm.workers[index].log_path.read_text(errors="replace")

    def logs_tail(self, lines: int = 15) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.log_tail(lines)}" for p in [self.farm.api, *self.farm.workers]
        )

    def heal(self) -> None:
        """Bring a farm a scenario left broken back: services up, every worker live."""
        if not self.farm.redis.process.is_running():
            self.farm.redis.start()
        assert self.farm.s3 is not None
        if not self.farm.s3.process.is_running():
            self.farm.s3.start()
        for index, process in enumerate(self.farm.workers):
            if not process.is_running():
                self.farm.restart_worker(index)
        self.farm.wait_for_workers(self.size.timeout_s)

    # -- recovery -------------------------------------------------------------------------------

    def in_play(
        self, job_ids: list[str], *, worker: int | None = None, running: bool = True
    ) -> dict[str, str]:
        """Jobs a fault hits now, with their `started_at`: running (on `worker`, when given), and
        unless `worker` is given, sent to a queue and not started."""
        raw = self.redis.zrange(self.keys.inflight(), 0, -1)
        inflight = {v.decode() if isinstance(v, bytes) else str(v) for v in raw}
        mark = None if worker is None else f"-{self.worker_pid(worker)}-"
        hit = {}
        for r in self.jobs(job_ids):
            on_it = r["state"] == "running" and (mark is None or mark in r.get("worker", ""))
            sent = worker is None and r["state"] == "queued" and r["job_id"] in inflight
            if (running and on_it) or sent:
                hit[r["job_id"]] = str(r.get("started_at", ""))
        return hit

    def wait_recovered(self, hit: dict[str, str], since: float) -> float:
        """Seconds from `since` until every job in `hit` has moved on: ended, or started again."""

        def moved_on() -> bool:
            records = self.jobs(list(hit))
            return all(
                r["state"] in TERMINAL
                or (r["state"] == "running" and str(r.get("started_at", "")) != hit[r["job_id"]])
                for r in records
            )

        self.wait_until(moved_on, f"{len(hit)} jobs hit by the fault to move on")
        return time.monotonic() - since

    # -- the bookkeeping --------------------------------------------------------------------------

    def tally(
        self, scenario: str, batches: str | list[str], recovery_s: float | None, notes: str = ""
    ) -> Row:
        """Count the outcome of the batches from the ledger and the bucket, once they ended."""
        batch_ids = [batches] if isinstance(batches, str) else batches
        ids = [j for batch_id in batch_ids for j in self.ledger.batch_job_ids(batch_id)]
        records = {r["job_id"]: r for r in self.jobs(ids)}
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.keys.job(job_id), "succeeded_count")
        succeeded_counts = dict(zip(ids, (int(v or 0) for v in pipe.execute()), strict=True))
        objects: dict[str, int] = {}
        assert self.farm.s3 is not None
        paginator = self.s3.get_paginator("list_objects_v2")
        for batch_id in batch_ids:
            prefix = f"images/{batch_id}/"
            for page in paginator.paginate(Bucket=self.farm.s3.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    job_id = item["Key"].rsplit("/", 1)[-1].removesuffix(".png")
                    objects[job_id] = objects.get(job_id, 0) + 1
        states = [records[j]["state"] if j in records else "missing" for j in ids]
        by_state = {s: states.count(s) for s in STATES}
        counters_ok = True
        for batch_id in batch_ids:
            batch = self.ledger.batch(batch_id)
            mine = [records[j]["state"] for j in records if j.startswith(batch_id + "-")]
            counted = {s: mine.count(s) for s in STATES}
            counters_ok &= batch["counts"] == counted and sum(counted.values()) == batch["total"]
        succeeded = [j for j in ids if records.get(j, {}).get("state") == "succeeded"]
        return Row(
            scenario=scenario,
            submitted=len(ids),
            succeeded=len(succeeded),
            failed=by_state["failed"],
            lost=sum(1 for s in states if s not in TERMINAL),
            duplicated=sum(1 for j in ids if objects.get(j, 0) > 1 or succeeded_counts[j] > 1),
            recovery_s=recovery_s,
            counters_ok=counters_ok,
            missing_objects=sum(1 for j in succeeded if objects.get(j, 0) != 1),
            notes=notes,
            details={"records": records, "objects": objects},
        )

    def queue_depth(self) -> int:
        return int(self.redis.llen(model_queue(MODEL)))
