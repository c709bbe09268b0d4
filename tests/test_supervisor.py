"""`sdfarm worker --gpus|--processes`: one supervised worker process per GPU or CPU slot.

No GPU runs here, so the GPU stories stop at the plan (a stand-in `nvidia-smi` lists two GPUs);
the CPU story runs real worker processes against the real Redis and S3 store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from producer.client import FarmClient
from producer.processes import ManagedProcess
from shared.errors import WorkerSetupError
from shared.keys import Keys
from shared.ledger.workers import live_workers
from tests.fixtures_farm import ROOT, FarmEnv
from worker.gpu_claims import GpuClaims
from worker.gpus import gpu_uuids
from worker.supervisor import child_worker_args, plan_children

TWO_GPUS = """#!/bin/sh
echo "GPU 0: NVIDIA H200 (UUID: GPU-11111111-2222-3333-4444-555555555555)"
echo "GPU 1: NVIDIA H200 (UUID: GPU-66666666-7777-8888-9999-000000000000)"
"""


@pytest.fixture
def two_gpu_path(tmp_path: Path) -> str:
    """A PATH whose `nvidia-smi -L` lists two GPUs, as on a two-GPU machine."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(TWO_GPUS)
    smi.chmod(0o755)
    return f"{smi.parent}:{os.environ['PATH']}"


def test_gpus_all_plans_one_worker_per_gpu_each_seeing_only_its_own(two_gpu_path: str) -> None:
    # Given a machine with two GPUs, When `--gpus all` is planned
    argv = ["--gpus", "all", "--model", "sd=/m", "--loglevel", "INFO"]
    children = plan_children(
        gpus="all",
        processes=None,
        device=None,
        worker_args=child_worker_args(argv),
        env={"PATH": two_gpu_path},
    )
    # Then there is one CUDA worker per GPU, each with its own CUDA_VISIBLE_DEVICES
    assert [c.env for c in children] == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "1"},
    ]
    for child in children:
        assert child.argv[-6:] == ["--model", "sd=/m", "--loglevel", "INFO", "--device", "cuda"]
        assert "--gpus" not in child.argv


def test_gpus_that_do_not_exist_are_refused_naming_the_ones_that_do(two_gpu_path: str) -> None:
    with pytest.raises(WorkerSetupError, match=r"no GPU 3 here; available: 0, 1"):
        plan_children(
            gpus="0,3", processes=None, device=None, worker_args=[], env={"PATH": two_gpu_path}
        )
    # And CUDA_VISIBLE_DEVICES narrows what `all` means
    env = {"PATH": two_gpu_path, "CUDA_VISIBLE_DEVICES": "1"}
    children = plan_children(gpus="all", processes=None, device=None, worker_args=[], env=env)
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in children] == ["1"]


def test_scaled_replicas_that_claim_a_gpu_each_get_a_different_one(
    two_gpu_path: str, redis_url: str
) -> None:
    # Given three replicas on a two-GPU machine, each seeing both GPUs
    client = redis.Redis.from_url(redis_url)
    candidates = gpu_uuids({"PATH": two_gpu_path})
    replicas = [GpuClaims(client, Keys(), owner=f"replica-{i}", ttl_s=30) for i in range(3)]
    # When each claims one
    held = [r.claim(candidates, 1) for r in replicas]
    # Then the first two hold different GPUs and the third waits for one
    assert held[0] != held[1] and sorted(held[0] + held[1]) == sorted(candidates)
    assert held[2] == []
    # And the plan gives each replica's worker only its own GPU, named by UUID
    [child] = plan_children(
        gpus=held[1][0], processes=None, device=None, worker_args=[], env={"PATH": two_gpu_path}
    )
    assert child.env == {"CUDA_VISIBLE_DEVICES": held[1][0]}
    # When the first stops, Then the waiting one gets its GPU
    replicas[0].release()
    stop = threading.Event()
    assert replicas[2].wait_for(candidates, 1, stop, retry_s=0.05) == held[0]


def test_gpus_on_a_machine_without_gpus_is_refused_with_a_clear_message() -> None:
    if any(Path(d, "nvidia-smi").exists() for d in os.environ["PATH"].split(":")):
        pytest.skip("this machine has nvidia-smi; the refusal is for machines without GPUs")
    # When `sdfarm worker --gpus all` runs where torch sees no CUDA device
    done = subprocess.run(
        [sys.executable, "-m", "producer", "worker", "--gpus", "all"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    # Then it refuses (exit 2) and says what to run instead
    assert done.returncode == 2, done.stderr
    assert "--gpus needs NVIDIA GPUs and this machine shows none" in done.stderr
    assert "--device cpu --processes N" in done.stderr


def _children(client: redis.Redis) -> dict[int, str]:
    return {int(w["pid"]): w["worker_id"] for w in live_workers(client, Keys())}


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s")
        time.sleep(0.2)


def test_cpu_workers_are_restarted_after_a_crash_and_drained_on_sigterm(
    farm_env: FarmEnv,
    serve_api,
) -> None:
    # Given `sdfarm worker --device cpu --processes 2`
    argv = [sys.executable, "-m", "producer", "worker", "--device", "cpu", "--processes", "2"]
    supervisor = ManagedProcess("supervisor", argv, log_dir=farm_env.log_dir, env=farm_env.env)
    client = redis.Redis.from_url(farm_env.settings.redis_url)
    supervisor.start()
    try:
        # Then two worker processes, children of the supervisor, join the registry
        _wait_for(lambda: len(_children(client)) == 2, 120, "two live workers")
        first = _children(client)
        assert all(_parent(pid) == supervisor.pid for pid in first)
        # And the supervisor itself never loaded torch
        assert "libtorch" not in Path(f"/proc/{supervisor.pid}/maps").read_text()

        # When one worker crashes
        crashed = min(first)
        os.kill(crashed, signal.SIGKILL)
        # Then the supervisor starts another in its place
        _wait_for(lambda: len(set(_children(client)) - set(first)) == 1, 120, "a replacement")
        _wait_for(lambda: len(_children(client)) == 2, 30, "two live workers again")
        assert crashed not in _children(client)

        # When it is told to stop while a job renders
        api_url = serve_api(farm_env.settings)
        with FarmClient(api_url) as farm:
            submitted = farm.submit(
                prompts=["a slow one"], defaults={"width": 64, "height": 64, "steps": 40}
            )
            job_id = submitted["job_ids"][0]
            _wait_for(lambda: farm.job(job_id)["state"] != "queued", 60, "the job to start")
            children = set(_children(client))
            os.kill(supervisor.pid, signal.SIGTERM)
            _wait_for(lambda: supervisor.returncode is not None, 90, "the supervisor to exit")
            state = farm.job(job_id)["state"]
    finally:
        supervisor.stop(timeout_s=30)
    # Then it drained: exit 0, every worker gone, the job finished or handed back, none lost
    assert supervisor.returncode == 0, supervisor.log_tail()
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)
    assert live_workers(client, Keys()) == []
    assert state in ("succeeded", "queued"), state


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])
