"""How the CLI shows things: progress bars and tables (rich). Bars go to stderr, tables to
stdout, so `--json` output and pipes stay clean."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from producer.terminal import printable

__all__ = [
    "batch_table",
    "batches_table",
    "duration",
    "file_progress",
    "job_text",
    "print_results",
    "wait_with_progress",
    "workers_table",
]

FINAL = ("succeeded", "failed", "cancelled")
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
RESULTS_SHOWN = 50  # rows of the results table; the rest is one line (the manifest has all)
_err = Console(stderr=True)


def _render(renderable: Any) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=120).print(renderable)
    return printable(buffer.getvalue().rstrip("\n"))


def duration(seconds: float | None) -> str:
    """`42 s`, `7 min`, `2.5 h`; `unknown` before any throughput was measured."""
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _ended(batch: Mapping[str, Any]) -> bool:
    return bool(sum(batch["counts"][s] for s in FINAL) == batch["total"])


def batch_table(batch: Mapping[str, Any]) -> str:
    table = Table(title=f"batch {batch['batch_id']}")
    for column in ("total", *STATES):
        table.add_column(column, justify="right")
    table.add_row(str(batch["total"]), *(str(batch["counts"][s]) for s in STATES))
    lines = [_render(table)]
    if _ended(batch):
        lines.append("ended" + (f"; manifest {batch['manifest']}" if batch.get("manifest") else ""))
    else:
        ahead = batch.get("queue_position")
        lines.append(
            f"priority {batch.get('priority')}, {ahead if ahead is not None else '?'} jobs ahead, "
            f"ETA {duration(batch.get('eta_s'))}"
        )
    return "\n".join(lines)


def batches_table(batches: Sequence[Mapping[str, Any]]) -> str:
    table = Table(title=f"{len(batches)} most recent batches")
    for column in ("batch", "created", "priority", "done", *STATES[1:], "ETA"):
        table.add_column(column)
    for b in batches:
        c = b["counts"]
        table.add_row(
            b["batch_id"],
            datetime.fromtimestamp(b["created_at"]).strftime("%Y-%m-%d %H:%M"),
            str(b.get("priority")),
            f"{sum(c[s] for s in FINAL)}/{b['total']}",
            *(str(c[s]) for s in STATES[1:]),
            "-" if _ended(b) else duration(b.get("eta_s")),
        )
    return _render(table)


def job_text(job: Mapping[str, Any]) -> str:
    progress = job.get("progress") or {}
    spec = job["spec"]
    step = f"step {progress.get('step', 0)}/{progress.get('steps', '?')}"
    lines = [
        f"job {job['job_id']}: {job['state']} ({step}, attempts {job.get('attempts', 0)})",
        f"  prompt: {spec['prompt']}",
        f"  seed {spec['seed']}, {spec['width']}x{spec['height']}, {spec['steps']} steps, "
        f"{spec['scheduler']}, guidance {spec['guidance']}",
    ]
    if job.get("result"):
        lines.append(f"  image: {job['result']['uri']}")
    if job.get("error"):
        lines.append(f"  error: {job['error']}")
    lines += [f"  warning: {warning}" for warning in job.get("warnings") or []]
    return printable("\n".join(lines))  # a prompt or an error may hold terminal escapes


def workers_table(workers: Sequence[Mapping[str, Any]]) -> str:
    table = Table(title=f"{len(workers)} live workers")
    for column in ("worker", "host", "device", "models", "images", "images/s", "current"):
        table.add_column(column)
    for w in workers:
        table.add_row(
            w["worker_id"],
            str(w.get("host")),
            str(w.get("device")),
            ", ".join(w.get("models", [])),
            str(w.get("images_done", 0)),
            f"{w.get('images_per_s', 0.0):.2f}",
            str(len(w.get("current") or [])),
        )
    return _render(table)


def wait_with_progress(
    client: Any,
    batch_id: str,
    *,
    timeout_s: float | None = None,
    quiet: bool = False,
    poll_s: float = 0.5,
) -> dict[str, Any]:
    """Poll the batch until every job is final, drawing a live progress bar on stderr."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=_err, disable=quiet, transient=False) as progress:
        task = progress.add_task(batch_id, total=None, detail="")
        while True:
            status: dict[str, Any] = client.batch(batch_id)
            counts = status["counts"]
            done = sum(counts[s] for s in FINAL)
            detail = f"running {counts['running']}"
            if counts["failed"] or counts["cancelled"]:
                detail += f", failed {counts['failed']}, cancelled {counts['cancelled']}"
            if done < status["total"]:
                detail += f", ETA {duration(status.get('eta_s'))}"
            progress.update(task, total=status["total"], completed=done, detail=detail)
            if done == status["total"]:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} not finished after {timeout_s}s")
            time.sleep(poll_s)


def print_results(client: Any, batch_id: str, status: dict[str, Any]) -> None:
    """A table of the batch's jobs (the first RESULTS_SHOWN) with their images or errors."""
    counts = status["counts"]
    table = Table(
        title=f"batch {batch_id}: {counts['succeeded']}/{status['total']} succeeded, "
        f"{counts['failed']} failed, {counts['cancelled']} cancelled"
    )
    for column in ("job", "state", "seed", "prompt", "image / error"):
        table.add_column(column, overflow="fold")
    for index, job in enumerate(client.jobs(batch_id)):
        if index == RESULTS_SHOWN:
            more = status["total"] - RESULTS_SHOWN
            table.add_row("…", "", "", f"{more} more: `sdfarm manifest {batch_id}`", "")
            break
        where = (job.get("result") or {}).get("uri") or job.get("error") or ""
        prompt = job["spec"]["prompt"][:40]
        # Text, not str: a prompt's `[bold]` is not rich markup, and its escapes are dropped.
        cells = (job["job_id"], job["state"], str(job["spec"]["seed"]), prompt, where)
        table.add_row(*(Text(printable(cell)) for cell in cells))
    Console().print(table)


@contextmanager
def file_progress(total: int, *, quiet: bool = False) -> Iterator[Callable[[Path, bool], None]]:
    """A bar for `sdfarm fetch`; yields the callback that advances it per file."""
    columns = (
        TextColumn("[bold]fetch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=_err, disable=quiet) as progress:
        task = progress.add_task("fetch", total=total, note="")

        def advance(path: Path, skipped: bool) -> None:
            note = f"{path.name} already intact" if skipped else path.name
            progress.update(task, advance=1, note=note)

        yield advance
