"""`make faults` (`python -m tests.faults`): every scenario, full size, on one real local farm.

Prints one row per scenario and exits 1 when any row lost or duplicated a job, when counters do
not add up, or when a scenario itself failed. `--small` runs the `make test` sizes;
`--only NAME` (repeatable) runs the scenarios whose function name contains NAME.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from tests.faults import api_processes, infra, redis_full, sentinel, stalled_uploads, tenants, work
from tests.faults.harness import FULL, SMALL, FaultFarm, Row

SCENARIOS: list[Callable[[FaultFarm], Row]] = [
    infra.kill_worker_twice,
    infra.sigterm_worker,
    infra.restart_redis,
    infra.delete_queue,
    infra.storage_outage,
    infra.outlive_visibility,
    infra.same_chunk_twice,
    work.poison_job,
    work.out_of_memory,
    work.bad_input_while_rendering,
    work.soak,
    api_processes.kill_api_mid_finish,
    tenants.hostile_tenant,
    sentinel.redis_master_failover,
    redis_full.redis_full_mid_submit,
    stalled_uploads.stalled_uploads,
]

HEADER = ("scenario", "submitted", "succeeded", "failed", "lost", "duplicated", "recovery")


def format_table(rows: list[Row]) -> str:
    lines = [
        (
            r.scenario,
            str(r.submitted),
            str(r.succeeded),
            str(r.failed),
            str(r.lost),
            str(r.duplicated),
            "-" if r.recovery_s is None else f"{r.recovery_s:.1f} s",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [HEADER, *lines]) for i in range(len(HEADER))]

    def fmt(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        return "| " + " | ".join(
            [first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]
        )

    out = [fmt(HEADER) + " |", "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(line) + " |" for line in lines]
    out += ["", *(f"- {r.scenario}: {r.notes}" for r in rows if r.notes)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--small", action="store_true", help="the sizes `make test` uses")
    parser.add_argument("--only", action="append", default=[], metavar="NAME")
    parser.add_argument("--keep", action="store_true", help="keep the farm's directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    chosen = [s for s in SCENARIOS if not args.only or any(n in s.__name__ for n in args.only)]
    state_dir = Path(tempfile.mkdtemp(prefix="sdfarm-faults-"))
    started = time.monotonic()
    print(f"starting a local farm in {state_dir} ...", flush=True)
    ff = FaultFarm.start(state_dir, SMALL if args.small else FULL)
    rows: list[Row] = []
    failed: list[str] = []
    try:
        for scenario in chosen:
            print(f"{scenario.__doc__.splitlines()[0] if scenario.__doc__ else ''}", flush=True)
            began = time.monotonic()
            try:
                row = scenario(ff)
            except Exception:
                failed.append(scenario.__name__)
                traceback.print_exc()
            else:
                rows.append(row)
                print(f"  done in {time.monotonic() - began:.0f} s: {row.notes}", flush=True)
                failed += [f"{row.scenario}: {p}" for p in row.problems()]
            ff.heal()
    finally:
        ff.stop()
    print(f"\n{format_table(rows)}\n\nall scenarios: {time.monotonic() - started:.0f} s")
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        print(f"logs kept in {state_dir}", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
