"""Scenarios 8-11: what the work itself throws at the farm (poison, out of memory, bad input,
a long soak with restarts)."""

from __future__ import annotations

from tests.faults.corpus import send_all
from tests.faults.harness import TINY, FaultFarm, Row
from worker.faults import POISON_MARKER

POISON_AT = 5  # index of the poison job in its batch: the middle of the second chunk of 4


def poison_job(ff: FaultFarm) -> Row:
    """8. A poison job among good ones: it fails alone, after its attempts, with its reason."""
    prompts = [f"poison scenario, good prompt {i}" for i in range(max(8, ff.size.jobs))]
    prompts[POISON_AT] = f"poison scenario {POISON_MARKER}"
    batch_id, ids = ff.submit_prompts(prompts, TINY)
    ff.wait_done(batch_id)
    poison = ff.jobs([ids[POISON_AT]])[0]
    row = ff.tally(
        "a poison job in a chunk of good ones",
        batch_id,
        None,
        notes=f"poison: {poison['state']} after {poison.get('attempts')} attempts",
    )
    row.details |= {"poison": poison, "poison_id": ids[POISON_AT]}
    return row


def out_of_memory(ff: FaultFarm) -> Row:
    """9. A simulated CUDA OOM above one row a pass: chunks split down to single rows."""
    ff.restart_workers({"SDFARM_SIMULATE_OOM_ABOVE_BATCH": "1"})
    try:
        pids = [ff.worker_pid(i) for i in range(len(ff.farm.workers))]
        batch_id, ids = ff.submit(ff.size.jobs, TINY, tag="oom")
        ff.wait_done(batch_id)
        survived = pids == [ff.worker_pid(i) for i in range(len(ff.farm.workers))] and all(
            p.is_running() for p in ff.farm.workers
        )
        rows = {r.get("timings", {}).get("batch_rows") for r in ff.jobs(ids)}
        splits = sum(ff.worker_log(i).count("trying again in halves") for i in range(2))
    finally:
        ff.restart_workers()  # the hook off again for the scenarios that follow
    row = ff.tally(
        "simulated OOM on passes above 1 row",
        batch_id,
        None,
        notes=f"{splits} splits; rows per pass {sorted(r for r in rows if r)}; "
        f"workers survived: {survived}",
    )
    row.details |= {"survived": survived, "rows_per_pass": rows, "splits": splits}
    return row


def bad_input_while_rendering(ff: FaultFarm) -> Row:
    """10. The bad-input corpus, sent while a batch renders: all refused, the batch finishes."""
    before = int(ff.redis.zcard(ff.keys.batches()))
    batch_id, _ = ff.submit(3 * ff.size.jobs, {"width": 64, "height": 64, "steps": 20}, tag="bad")
    answers = list(send_all(ff.farm.api_url, ff.farm.api_key))
    during = ff.ledger.batch(batch_id)["counts"]
    ff.wait_done(batch_id)
    created = int(ff.redis.zcard(ff.keys.batches())) - before - 1
    problems = {a.case.name: a.problems() for a in answers if a.problems()}
    row = ff.tally(
        "bad-input corpus while a batch renders",
        batch_id,
        None,
        notes=f"{len(answers) - len(problems)}/{len(answers)} refused well; "
        f"{created} batches created by them",
    )
    row.details |= {"problems": problems, "created": created, "during": during}
    return row


def soak(ff: FaultFarm) -> Row:
    """11. Many tiny jobs, worker-0 restarted every N of them: no loss, no memory growth.

    The jobs go in waves of N (one batch each); after each wave both workers' resident memory is
    read, then worker-0 is restarted (a warm stop) and the next wave starts once it is back.
    Worker-1 lives through all the waves, so its memory shows any growth over the whole soak.
    """
    size = ff.size
    spec = {"width": 64, "height": 64, "steps": 2}
    batches: list[str] = []
    rss: list[tuple[int, float, float]] = []  # (jobs done, worker-0 before restart, worker-1)
    for start in range(0, size.soak_jobs, size.soak_restart_every):
        count = min(size.soak_restart_every, size.soak_jobs - start)
        batch_id, _ = ff.submit(count, spec, tag=f"soak {start}")
        batches.append(batch_id)
        ff.wait_done(batch_id)
        rss.append((start + count, ff.worker_rss_mib(0), ff.worker_rss_mib(1)))
        if start + count < size.soak_jobs:
            ff.farm.restart_worker(0)
            ff.farm.wait_for_workers(size.timeout_s)
    shown = ", ".join(f"{w0:.0f}/{w1:.0f}" for _, w0, w1 in rss)
    row = ff.tally(
        f"soak: {size.soak_jobs} jobs, a restart every {size.soak_restart_every}",
        batches,
        None,
        notes=f"RSS MiB of worker-0/worker-1 after each wave: {shown}",
    )
    row.details |= {"rss": rss}
    return row
