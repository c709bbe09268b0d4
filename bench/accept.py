"""How fast the front door takes a big batch, and how fast it answers while people watch it.

    python -m bench.accept [--jobs 100000] [--pollers 20] [--polls 100]

Starts a private Redis and the API (`sdfarm api`, its own process, file:// storage, no workers),
posts JOBS jobs as one streamed NDJSON body, then has POLLERS threads poll
`GET /v1/batches/{id}` on that batch, twice: back to back (each poller sends its next request
the moment the last one answers: the API's saturation point, where latency is mostly queueing
behind the other pollers) and paced (each poller every INTERVAL ms, as `sdfarm wait` and the
dashboard poll). Reports p50 and p99 of both. Prints one JSON line.

Polling starts once Redis has finished the AOF rewrite that writing 100,000 jobs sets off (its
file passes the 64 MB `auto-aof-rewrite-min-size`): on two cores the rewrite's child process
takes one core for about a second, and every request waits behind it. The wait is reported
(`redis_settle_s`); a farm on a bigger machine gives the rewrite a core of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis

from producer.processes import ManagedProcess, free_port
from producer.services import start_redis

KEY = "bench-key"
QUIET_S = 0.5  # Redis checks whether to start a rewrite every 100 ms: quiet this long is done


def ndjson_lines(count: int) -> Iterator[bytes]:
    """Jobs as NDJSON, a few hundred lines per yielded piece (what a streaming client sends)."""
    piece: list[str] = []
    for i in range(count):
        job = {"prompt": f"a watercolor of lighthouse number {i}, stormy sea", "seed": i}
        piece.append(json.dumps({**job, "width": 512, "height": 512, "steps": 30}))
        if len(piece) == 500:
            yield ("\n".join(piece) + "\n").encode()
            piece = []
    if piece:
        yield ("\n".join(piece) + "\n").encode()


def poll(url: str, batch_id: str, count: int, out: list[float], interval_s: float = 0.0) -> None:
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        # Paced pollers start spread over one interval, as independent clients would.
        time.sleep(random.uniform(0, interval_s))
        for _ in range(count):
            started = time.perf_counter()
            http.get(f"{url}/v1/batches/{batch_id}").raise_for_status()
            took = time.perf_counter() - started
            out.append(took)
            if interval_s:
                time.sleep(max(0.0, interval_s - took))


def poll_all(
    url: str, batch_id: str, pollers: int, polls: int, interval_s: float
) -> tuple[list[float], float]:
    """Every request's latency, and the wall time of the whole run."""
    latencies: list[float] = []
    started = time.perf_counter()
    threads = [
        threading.Thread(target=poll, args=(url, batch_id, polls, latencies, interval_s))
        for _ in range(pollers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started


def wait_for_aof_rewrite(url: str, timeout_s: float = 60.0) -> float:
    """Seconds until Redis has no AOF rewrite running or scheduled (it may start a moment late)."""
    started = time.monotonic()
    quiet_since = None
    with redis.Redis.from_url(url) as r:
        while time.monotonic() - started < timeout_s:
            info = r.info("persistence")
            busy = info.get("aof_rewrite_in_progress") or info.get("aof_rewrite_scheduled")
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= QUIET_S:
                break
            time.sleep(0.05)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--pollers", type=int, default=20)
    parser.add_argument("--polls", type=int, default=100, help="requests per poller")
    parser.add_argument("--interval-ms", type=float, default=100.0, help="paced pollers' period")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdfarm-bench-") as tmp:
        root = Path(tmp)
        redis_service = start_redis(root / "redis")
        port = free_port()
        env = {
            **os.environ,
            "SDFARM_REDIS_URL": redis_service.url,
            "SDFARM_STORAGE_URL": f"file://{root / 'images'}",
            "SDFARM_MODELS": "tiny=/nonexistent/tiny",
            "SDFARM_API_KEYS": KEY,
        }
        argv = [sys.executable, "-m", "producer", "api", "--port", str(port)]
        url = f"http://127.0.0.1:{port}"
        api = ManagedProcess(
            "api",
            argv,
            log_dir=root,
            env=env,
            ready=lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200,
        )
        try:
            api.start()
            api.wait_ready(60)
            started = time.perf_counter()
            response = httpx.post(
                f"{url}/v1/batches",
                content=ndjson_lines(args.jobs),
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-ndjson"},
                timeout=300,
            )
            accept_s = time.perf_counter() - started
            response.raise_for_status()
            batch_id = response.json()["batch_id"]
            settle_s = wait_for_aof_rewrite(redis_service.url)
            latencies, wall_s = poll_all(url, batch_id, args.pollers, args.polls, 0.0)
            paced, _ = poll_all(url, batch_id, args.pollers, args.polls, args.interval_ms / 1000)
        finally:
            api.stop(10)
            redis_service.stop()
    cuts = statistics.quantiles(latencies, n=100)
    paced_cuts = statistics.quantiles(paced, n=100)
    print(
        json.dumps(
            {
                "jobs": args.jobs,
                "accept_s": round(accept_s, 2),
                "redis_settle_s": round(settle_s, 2),
                "pollers": args.pollers,
                "polls": len(latencies),
                "get_batch_p50_ms": round(cuts[49] * 1000, 1),
                "get_batch_p99_ms": round(cuts[98] * 1000, 1),
                "get_batch_per_s": round(len(latencies) / wall_s),  # the API's saturation rate
                "paced_interval_ms": args.interval_ms,
                "get_batch_paced_p50_ms": round(paced_cuts[49] * 1000, 1),
                "get_batch_paced_p99_ms": round(paced_cuts[98] * 1000, 1),
            }
        )
    )
    return 0 if accept_s < 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
