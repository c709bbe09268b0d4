"""Scenarios 1-7: the farm's parts break under a running batch (workers, Redis, broker, store).

Each submits its own batch, breaks something mid-batch, waits for the batch to end, and returns
its row of the table (`harness.Row`); `details` carries what a test asserts on beyond the row.
"""

from __future__ import annotations

import signal
import time

from shared.celery_app import RENDER_CHUNK, make_celery, model_queue
from shared.config import Settings
from tests.faults.harness import MODEL, SLOW, TINY, FaultFarm, Row

# Short chunks, but long enough that a fault lands while some run and others wait.
BRISK = {"width": 64, "height": 64, "steps": 30}


def kill_worker_twice(ff: FaultFarm) -> Row:
    """1. `kill -9` a worker mid-chunk, twice in one batch: the leases bring its jobs back."""
    batch_id, ids = ff.submit(3 * ff.size.jobs, SLOW, tag="kill")
    recoveries = []
    for _ in range(2):
        ff.wait_running_on(0, ids, min_step=2)
        hit = ff.in_play(ids, worker=0)
        killed_at = time.monotonic()
        ff.farm.kill_worker(0)
        ff.farm.restart_worker(0)  # the new process loads while worker-1 carries on
        recoveries.append(ff.wait_recovered(hit, killed_at))
        ff.farm.wait_for_workers(ff.size.timeout_s)
    ff.wait_done(batch_id)
    return ff.tally(
        "kill -9 a worker mid-chunk, twice",
        batch_id,
        max(recoveries),
        notes=f"recovered in {recoveries[0]:.1f} s and {recoveries[1]:.1f} s",
    )


def sigterm_worker(ff: FaultFarm) -> Row:
    """2. SIGTERM a worker mid-chunk: its chunk finishes; with no grace left, it is handed back."""
    batch_id, ids = ff.submit(3 * ff.size.jobs, SLOW, tag="sigterm")
    # With the farm's grace (30 s) the running chunk finishes before the worker exits.
    finishing = ff.wait_running_on(0, ids, min_step=2)
    ff.signal_worker(0, signal.SIGTERM)
    codes = [ff.wait_exit(0)]
    # With no grace the chunk stops at its next step and its jobs go back to `queued`.
    ff.farm.restart_worker(0, {"SDFARM_SHUTDOWN_GRACE_S": "0"})
    ff.farm.wait_for_workers(ff.size.timeout_s)
    handed = ff.wait_running_on(0, ids, min_step=2)
    hit = ff.in_play(ids, worker=0)
    stopped_at = time.monotonic()
    ff.signal_worker(0, signal.SIGTERM)
    codes.append(ff.wait_exit(0))
    ff.farm.restart_worker(0)
    recovery = ff.wait_recovered(hit, stopped_at)
    ff.wait_done(batch_id)
    row = ff.tally(
        "SIGTERM a worker mid-chunk",
        batch_id,
        recovery,
        notes=f"exit codes {codes}; {len(finishing)} finished in the grace, "
        f"{len(handed)} handed back without it",
    )
    row.details |= {"exit_codes": codes, "finishing": finishing, "handed": handed}
    return row


def restart_redis(ff: FaultFarm) -> Row:
    """3. Restart Redis (AOF on) mid-batch: the same workers reconnect and consume on."""
    pids = [ff.worker_pid(i) for i in range(len(ff.farm.workers))]
    batch_id, ids = ff.submit(3 * ff.size.jobs, BRISK, tag="redis")
    ff.wait_until(lambda: ff.ledger.batch(batch_id)["counts"]["succeeded"] >= 4, "some progress")
    ff.farm.redis.restart()
    restarted_at = time.monotonic()
    recovery = ff.wait_recovered(ff.in_play(ids), restarted_at)
    ff.wait_done(batch_id)
    # Consuming on means new work after the restart renders too, on the same processes.
    after_id, _ = ff.submit(4, TINY, tag="after-redis")
    after = ff.wait_done(after_id)
    same = pids == [ff.worker_pid(i) for i in range(len(ff.farm.workers))]
    alive = all(p.is_running() for p in ff.farm.workers)
    row = ff.tally(
        "restart Redis mid-batch (AOF)",
        batch_id,
        recovery,
        notes=f"same worker processes: {same and alive}; "
        f"a batch sent after it: {after['succeeded']}/4 succeeded",
    )
    row.details |= {"same_workers": same and alive, "after": after}
    return row


def delete_queue(ff: FaultFarm) -> Row:
    """4. Delete the Celery queue key mid-batch: the reconciler sends the lost chunks again."""
    batch_id, ids = ff.submit(3 * ff.size.jobs, BRISK, tag="queue")
    ff.wait_until(lambda: ff.queue_depth() > 0, "a chunk waiting in the queue")
    hit = ff.in_play(ids, running=False)
    deleted = int(ff.redis.llen(model_queue(MODEL)))
    ff.redis.delete(model_queue(MODEL))
    deleted_at = time.monotonic()
    recovery = ff.wait_recovered(hit, deleted_at)
    ff.wait_done(batch_id)
    resent = sum(1 for r in ff.jobs(ids) if r.get("dispatches", 0) > 1)
    row = ff.tally(
        "delete the Celery queue key",
        batch_id,
        recovery,
        notes=f"{deleted} queued chunks deleted; {resent} jobs sent again",
    )
    row.details |= {"resent": resent}
    return row


def storage_outage(ff: FaultFarm) -> Row:
    """5. Stop SeaweedFS mid-batch, start it again: jobs wait (handed back), none fails."""
    assert ff.farm.s3 is not None
    batch_id, ids = ff.submit(3 * ff.size.jobs, BRISK, tag="s3")
    ff.wait_until(lambda: ff.ledger.batch(batch_id)["counts"]["succeeded"] >= 2, "some progress")
    ff.farm.s3.stop()
    time.sleep(ff.size.storage_outage_s)
    ff.farm.s3.start()
    back_at = time.monotonic()
    recovery = ff.wait_recovered(ff.in_play(ids), back_at)
    ff.wait_done(batch_id)
    waited = [r for r in ff.jobs(ids) if "storage unavailable" in r.get("last_error", "")]
    row = ff.tally(
        f"stop SeaweedFS for {ff.size.storage_outage_s:.0f} s",
        batch_id,
        recovery,
        notes=f"{len(waited)} jobs handed back while it was down",
    )
    row.details |= {"handed_back": len(waited)}
    return row


def outlive_visibility(ff: FaultFarm) -> Row:
    """6. A chunk outlives the visibility timeout: Celery delivers it again; that copy skips."""
    # One chunk of 4 rows that renders for well over the farm's 6 s visibility timeout (about
    # 2.5x on a quiet 2-core machine), so a restore sweep (every 2 s) finds it still unacked.
    batch_id, ids = ff.submit(4, {"width": 192, "height": 192, "steps": 150}, tag="visibility")
    ff.wait_done(batch_id)
    records = ff.jobs(ids)
    longest = max(float(r["finished_at"]) - float(r["started_at"]) for r in records)
    # Celery restores the unacked message on its next sweep, which may come after the chunk
    # ended; the copy is then consumed by whichever worker is free. Give it time to show up.
    ff.wait_until(
        lambda: _skipped_deliveries(ff, ids[0]) >= 1, "the redelivered copy", timeout_s=60
    )
    copies = _skipped_deliveries(ff, ids[0])
    row = ff.tally(
        "a chunk outlives the visibility timeout",
        batch_id,
        None,
        notes=f"chunk ran {longest:.0f} s (timeout 6 s); delivered again {copies}x, skipped",
    )
    row.details |= {"chunk_s": longest, "copies": copies}
    return row


def same_chunk_twice(ff: FaultFarm) -> Row:
    """7. Two workers are handed the same chunk at once: each job ends with one result."""
    batch_id, ids = ff.submit(4, BRISK, tag="twice")
    app = make_celery(Settings(redis_url=ff.farm.redis.url))
    try:
        for _ in range(2):  # on top of the dispatcher's own message: three copies in all
            app.send_task(
                RENDER_CHUNK, args=[ids], kwargs={"model": MODEL}, queue=model_queue(MODEL)
            )
    finally:
        app.close()
    ff.wait_done(batch_id)
    # Wait for the copies that lost the race to be consumed too, so the count is complete.
    ff.wait_until(lambda: _skipped_deliveries(ff, ids[0]) >= 2, "the extra copies to be skipped")
    # Which workers took a copy: the ones that rendered its jobs, and the ones that skipped it.
    pids = {i: f"-{ff.worker_pid(i)}-" for i in range(len(ff.farm.workers))}
    rendered = {i for r in ff.jobs(ids) for i, mark in pids.items() if mark in r["worker"]}
    skipped = {i for i in pids if f"chunk {ids[0]}: skipped" in ff.worker_log(i)}
    row = ff.tally(
        "two workers handed the same chunk",
        batch_id,
        None,
        notes=f"3 copies sent; {_skipped_deliveries(ff, ids[0])} skipped; "
        f"workers that rendered: {sorted(rendered)}, that skipped: {sorted(skipped)}",
    )
    row.details |= {"took_a_copy": rendered | skipped}
    return row


def _skipped_deliveries(ff: FaultFarm, first_job: str) -> int:
    """Deliveries of the chunk starting with `first_job` that found nothing left to do."""
    needle = f"chunk {first_job}: skipped"
    return sum(ff.worker_log(i).count(needle) for i in range(len(ff.farm.workers)))
