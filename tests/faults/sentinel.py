"""Scenario 14: the Redis master dies mid-batch and Sentinel promotes its replica.

The scenario runs on a farm of its own (`SentinelFarm`): the same `LocalFarm` (its Redis with
AOF, SeaweedFS, the API, two workers on the tiny model, the fault suite's short timeouts), whose
Redis is the master of a group, one replica and three sentinels (`producer.sentinel_server`,
down after 1 s, failover timeout 3 s), and whose API and workers know only the sentinels
(`SDFARM_REDIS_SENTINELS`): the ledger and the Celery broker both go through them.

The master is killed with SIGKILL while the batch renders. Every job the API acknowledged must
end in a final state, once and with one object, on the same worker processes, and a batch sent
after the failover must render too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from producer.local import LocalFarm
from producer.sentinel_server import SentinelGroup, start_sentinel_group
from shared.config import Settings
from shared.ledger import Ledger
from shared.redis_client import connect
from tests.faults.harness import FARM_ENV, TINY, FaultFarm, Row, Size
from tests.faults.infra import BRISK

__all__ = ["SentinelFarm", "fail_over", "redis_master_failover"]

MASTER_NAME = "sdfarm"


class SentinelFarm(LocalFarm):
    """A `LocalFarm` whose Redis has a replica and three sentinels, and whose processes reach
    it only through the sentinels."""

    group: SentinelGroup

    def _child_env(self) -> dict[str, str]:
        # LocalFarm asks for its children's settings once its Redis is up and before it starts
        # the API: the moment the group must be formed. Its processes are stopped with the farm.
        self.group = start_sentinel_group(
            self.state_dir / "sentinel", self.redis, master_name=MASTER_NAME
        )
        self._started += self.group.processes()
        # The farm's own look at its workers' heartbeats follows the master too.
        if self._ledger_redis is not None:
            self._ledger_redis.close()
        self._ledger_redis = connect(self.settings)
        return super()._child_env() | {
            "SDFARM_REDIS_SENTINELS": self.group.addresses,
            "SDFARM_REDIS_MASTER": MASTER_NAME,
        }

    @property
    def settings(self) -> Settings:
        """What a client of this farm's Redis needs: the sentinels and the master's name."""
        return Settings(
            redis_url=self.redis.url,
            redis_sentinels=self.group.addresses,
            redis_master=MASTER_NAME,
            redis_socket_timeout_s=5,
            redis_connect_timeout_s=1,
        )


def redis_master_failover(ff: FaultFarm) -> Row:
    """14. SIGKILL the Redis master mid-batch: Sentinel promotes the replica, the farm goes on."""
    return fail_over(ff.farm.state_dir / "sentinel-farm", ff.farm.models, ff.size)


def fail_over(
    state_dir: Path, models: Mapping[str, str], size: Size, *, workers: int = 2, jobs: int = 0
) -> Row:
    """Start a `SentinelFarm`, kill its master mid-batch of `jobs` (default: 3 x the size's),
    and count the batch once it ended. The farm is stopped before this returns."""
    farm = SentinelFarm(state_dir=state_dir, workers=workers, models=models, extra_env=FARM_ENV)
    farm.start()
    try:
        farm.wait_for_workers(size.timeout_s)
        ff = FaultFarm(farm, size)
    except BaseException:
        farm.stop()
        raise
    try:
        # The scenario's own reads go through the sentinels as well.
        ff.redis.close()
        ff.redis = connect(farm.settings)
        ff.ledger = Ledger(ff.redis, status_ttl_s=24 * 3600, lease_s=4)
        return _kill_the_master(ff, farm.group, jobs or 3 * size.jobs)
    finally:
        if farm.s3 is not None:
            farm.s3.process.kill()  # its objects are counted; a clean stop takes SeaweedFS 10 s
        ff.stop()


def _kill_the_master(ff: FaultFarm, group: SentinelGroup, jobs: int) -> Row:
    pids = [ff.worker_pid(i) for i in range(len(ff.farm.workers))]
    batch_id, ids = ff.submit(jobs, BRISK, tag="failover")
    ff.wait_until(lambda: ff.ledger.batch(batch_id)["counts"]["succeeded"] >= 4, "some progress")
    old_master = group.master_address()
    hit = ff.in_play(ids)
    ff.farm.redis.process.kill()  # SIGKILL: no shutdown, no last AOF fsync
    killed_at = time.monotonic()
    promoted = ff.wait_until(
        lambda: (address := group.master_address()) != old_master and address,
        "the sentinels to promote the replica",
    )
    promoted_s = time.monotonic() - killed_at
    recovery = ff.wait_recovered(hit, killed_at)
    ff.wait_done(batch_id)
    # Consuming on means new work after the failover renders too, on the same processes.
    after_id, _ = ff.submit(4, TINY, tag="after-failover")
    after = ff.wait_done(after_id)
    same = pids == [ff.worker_pid(i) for i in range(len(ff.farm.workers))]
    alive = all(p.is_running() for p in ff.farm.workers)
    row = ff.tally(
        "a Redis master failover through Sentinel",
        batch_id,
        recovery,
        notes=f"replica promoted {promoted_s:.1f} s after the kill; {len(hit)} jobs in play; "
        f"same worker processes: {same and alive}; "
        f"a batch sent after it: {after['succeeded']}/4 succeeded",
    )
    row.details |= {
        "same_workers": same and alive,
        "after": after,
        "promoted_s": promoted_s,
        "new_master": promoted,
        "old_master": old_master,
    }
    return row
