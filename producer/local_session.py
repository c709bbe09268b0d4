"""`sdfarm up` in a terminal: start a local farm, print how to use it, watch it, stop it.

The farm itself (what runs, in what order, with which settings) is `producer.local.LocalFarm`;
this module is the foreground session around it: Ctrl-C and SIGTERM both lead to an orderly stop,
and a child that dies on its own stops the whole farm with the end of its log on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import redis

from producer.local import LocalFarm

__all__ = ["run_local_farm"]

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5  # how often `sdfarm up` looks for a child that died


def run_local_farm(
    *,
    workers: int,
    models: dict[str, str],
    storage: str,
    api_port: int | None,
    state_dir: Path,
    device: str = "cpu",
) -> int:
    """`sdfarm up`: start a farm, print how to use it, run until Ctrl-C or SIGTERM.

    Returns 0 after a requested stop, 1 when a child died on its own (everything is then stopped).
    """
    farm = LocalFarm(
        state_dir=state_dir,
        workers=workers,
        models=models,
        storage=storage,
        api_port=api_port,
        device=device,
    )
    # SIGTERM takes the same path as Ctrl-C: out of the wait, into the orderly stop below. Both
    # are set explicitly: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    previous = {
        signum: signal.signal(signum, _raise_keyboard_interrupt)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        print(f"starting a local farm in {farm.state_dir} ...", flush=True)
        farm.start()
        _print_summary(farm)
        return _watch(farm)
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C must not cut the stop short and leave children behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(OSError):  # stdout may be a pipe that is already gone
            print("stopping the farm ...", flush=True)
        farm.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _watch(farm: LocalFarm) -> int:
    announced: set[int] = set()
    while True:
        time.sleep(WATCH_INTERVAL_S)
        dead = farm.dead_processes()
        if dead:
            for process in dead:
                print(
                    f"error: {process.name} exited with status {process.returncode}; "
                    f"the end of {process.log_path}:\n{process.log_tail(15)}",
                    file=sys.stderr,
                )
            return 1
        if len(announced) < len(farm.workers):
            with contextlib.suppress(redis.RedisError):
                for index in sorted(farm.live_worker_indexes() - announced):
                    print(f"worker-{index} is ready ({farm.device})", flush=True)
                    announced.add(index)


def _print_summary(farm: LocalFarm) -> None:
    storage = farm.s3.endpoint_url if farm.s3 is not None else farm.env["SDFARM_STORAGE_URL"]
    print(
        f"\nsdfarm is up: {farm.worker_count} worker(s) on {farm.device} "
        f"(loading {', '.join(farm.models)}), logs in {farm.log_dir}\n"
        f"  API       {farm.api_url}  (docs at {farm.api_url}/docs)\n"
        f"  dashboard {farm.api_url}/  (paste the API key below into its key field)\n"
        f"  Redis     {farm.redis.url}\n"
        f"  storage   {storage}\n\n"
        "In another shell:\n"
        f"  export SDFARM_API_URL={farm.api_url}\n"
        f"  export SDFARM_API_KEY={farm.api_key}\n"
        f"or: source {farm.env_file}\n\n"
        "Ctrl-C stops the farm.",
        flush=True,
    )
