"""How the CLI shows things: progress bars and tables (rich), on stderr/stdout."""

from __future__ import annotations

import io
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["batch_table", "job_text", "print_results", "wait_with_progress", "workers_table"]

FINAL = ("succeeded", "failed", "cancelled")
_err = Console(stderr=True)


def _render(renderable: Any) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=120).print(renderable)
    return buffer.getvalue().rstrip("\n")


def batch_table(batch: dict[str, Any]) -> str:
    table = Table(title=f"batch {batch['batch_id']}")
    table.add_column("total", justify="right")
    for state in ("queued", "running", "succeeded", "failed", "cancelled"):
        table.add_column(state, justify="right")
    table.add_row(
        str(batch["total"]),
        *(
            str(batch["counts"][s])
            for s in ("queued", "running", "succeeded", "failed", "cancelled")
        ),
    )
    return _render(table)


def job_text(job: dict[str, Any]) -> str:
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
    return "\n".join(lines)


def workers_table(workers: list[dict[str, Any]]) -> str:
    table = Table(title=f"{len(workers)} live workers")
    for column in ("worker", "host", "device", "models", "images", "current"):
        table.add_column(column)
    for w in workers:
        table.add_row(
            w["worker_id"],
            str(w.get("host")),
            str(w.get("device")),
            ", ".join(w.get("models", [])),
            str(w.get("images_done", 0)),
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
    """Poll the batch until every job is final, drawing a progress bar on stderr."""
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
            status = client.batch(batch_id)
            counts = status["counts"]
            done = sum(counts[s] for s in FINAL)
            detail = (
                f"running {counts['running']}, failed {counts['failed']}"
                if counts["failed"]
                else f"running {counts['running']}"
            )
            progress.update(task, total=status["total"], completed=done, detail=detail)
            if done == status["total"]:
                return status  # type: ignore[no-any-return]
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} not finished after {timeout_s}s")
            time.sleep(poll_s)


def print_results(client: Any, batch_id: str, status: dict[str, Any]) -> None:
    """A table of the batch's jobs (the first 50) and the counts."""
    table = Table(
        title=f"batch {batch_id}: {status['counts']['succeeded']}/{status['total']} succeeded"
    )
    for column in ("job", "state", "seed", "prompt", "image / error"):
        table.add_column(column, overflow="fold")
    for index, job in enumerate(client.jobs(batch_id)):
        if index == 50:
            table.add_row("…", "", "", f"{status['total'] - 50} more", "")
            break
        where = (job.get("result") or {}).get("uri") or job.get("error") or ""
        table.add_row(
            job["job_id"], job["state"], str(job["spec"]["seed"]), job["spec"]["prompt"][:40], where
        )
    Console().print(table)
