"""A fault scenario: several `sdfarm api` processes on one Redis, one killed (SIGKILL) mid-finish.

A batch's finish (manifest, webhook) must happen exactly once however many API processes run:
the one that took the batch is killed between storing the manifest and scheduling the webhook
(the `fault_finish_pause_s` test hook holds it there), and another must take over once its
claim lapses, store no second manifest and send exactly one webhook, with the batch's fixed
delivery id. The pieces are shared with tests/test_api_replicas.py.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from producer.processes import ManagedProcess, free_port
from producer.webhooks import DELIVERY_HEADER, delivery_id
from shared.ledger import Ledger
from tests.faults.harness import TINY, FaultFarm, Row
from tests.hook_receiver import Receiver, receiving

# Every API process holds a finish here for 3 s, on a 5 s claim: the kill lands in the pause,
# and the batch is taken over about 5 s later.
FINISH_ENV = {"SDFARM_FAULT_FINISH_PAUSE_S": "3", "SDFARM_FINISH_LEASE_S": "5"}
API_COUNT = 3


def api_process(name: str, env: Mapping[str, str], log_dir: Path) -> tuple[ManagedProcess, str]:
    """An `sdfarm api` process on a free port, ready once /healthz answers 200; and its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "producer", "api", "--host", "127.0.0.1", "--port", str(port)]
    process = ManagedProcess(
        name,
        argv,
        log_dir=log_dir,
        env=dict(env),
        ready=lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200,
    )
    return process, url


def wait_mid_finish(ledger: Ledger, batch_id: str, timeout_s: float) -> str:
    """Wait until a finisher stored the batch's manifest but has not scheduled its webhook;
    returns that finisher's claim owner (`host-pid-nonce`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = ledger.batch(batch_id)
        owner = ledger.loops.finish_owner(batch_id)
        if owner and record.manifest and not record.get("webhook_state"):
            return owner
        time.sleep(0.02)
    raise TimeoutError(f"batch {batch_id} was never caught mid-finish")


def owner_process(owner: str, processes: list[ManagedProcess]) -> ManagedProcess:
    pid = int(owner.rsplit("-", 2)[1])
    return next(p for p in processes if p.pid == pid)


def manifests_stored(processes: list[ManagedProcess], batch_id: str) -> int:
    """How many times any of the processes logged storing the batch's manifest."""
    needle = f"batch {batch_id}: manifest stored at"
    return sum(p.log_path.read_text(errors="replace").count(needle) for p in processes)


def wait_settled(ledger: Ledger, batch_id: str, receiver: Receiver, timeout_s: float) -> None:
    """Wait for the webhook to be delivered and nothing of the finish to be left, then a few
    seconds more for a repeat that should not come."""
    deadline = time.monotonic() + timeout_s
    while not (
        receiver.posts
        and ledger.batch(batch_id).webhook == {"state": "delivered", "attempts": 1, "error": None}
        and ledger.loops.finish_owner(batch_id) is None
        and not ledger.webhooks.due(time.time() + 3600, 10)
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id}: webhook not delivered in {timeout_s:.0f} s")
        time.sleep(0.1)
    time.sleep(6)  # longer than a claim: a second finisher would have scheduled its repeat


def kill_api_mid_finish(ff: FaultFarm) -> Row:
    """An API process killed (SIGKILL) mid-finish with 3 running: one manifest, one webhook."""
    farm = ff.farm
    farm.api.stop()
    farm.api.env = {**farm.env, **FINISH_ENV}
    farm.api.start()
    extras = [api_process(f"api-{i}", farm.api.env, farm.log_dir)[0] for i in (1, 2)]
    apis = [farm.api, *extras]
    try:
        for process in extras:
            process.start()
        for process in apis:
            process.wait_ready(60)
        with receiving() as receiver:
            prompts = [f"api fault prompt {i}, a lighthouse" for i in range(ff.size.jobs)]
            submitted = ff.client.submit(prompts=prompts, defaults=TINY, callback_url=receiver.url)
            batch_id = str(submitted["batch_id"])
            owner = wait_mid_finish(ff.ledger, batch_id, ff.size.timeout_s)
            killed = owner_process(owner, apis)
            killed.kill()
            killed_at = time.monotonic()
            wait_settled(ff.ledger, batch_id, receiver, ff.size.timeout_s)
            recovery = receiver.posts[0].at - killed_at
            ids = {post.headers[DELIVERY_HEADER] for post in receiver.posts}
            posts = len(receiver.posts)
        manifests = manifests_stored(apis, batch_id)
    finally:
        for process in extras:
            process.stop()
        farm.api.stop()
        farm.api.env = farm.env
        farm.api.start()
        farm.api.wait_ready(60)
    row = ff.tally(
        f"an API process killed mid-finish with {API_COUNT} running",
        batch_id,
        recovery,
        notes=f"killed {killed.name}; manifest stored {manifests}x, webhook delivered {posts}x, "
        f"{len(ids)} delivery id(s)",
    )
    fixed = ids == {delivery_id(batch_id, "batch.finished")}
    row.lost += 0 if posts else 1  # a webhook that never came is a lost finish
    row.duplicated += max(0, manifests - 1) + max(0, posts - 1) + (0 if fixed else 1)
    row.details |= {"manifests": manifests, "posts": posts, "delivery_ids": ids}
    return row
