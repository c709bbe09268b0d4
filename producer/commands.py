"""The client side of `sdfarm`: submit, status, batches, wait, fetch, cancel, retry, workers,
manifest. Each takes the parsed arguments and returns the exit code (see `producer.cli`).

Every read command takes `--json` and then prints only JSON on stdout; progress and notes go to
stderr, so `sdfarm submit prompts.txt` prints just the batch id and composes in scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from producer import views
from producer.client import FarmClient
from producer.client_types import Submitted
from shared.config import Settings
from shared.errors import InvalidJob
from shared.ids import is_batch_id, is_job_id
from shared.metadata import read_png_metadata

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "HANDLERS"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3
IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")  # what --from-png reads infotexts from
JOB_OPTIONS = (
    *("model", "scheduler", "steps", "guidance", "width", "height", "seed"),
    *("output_format", "quality"),
)


def client() -> FarmClient:
    """A client for SDFARM_API_URL with SDFARM_API_KEY (what `source .sdfarm/env` sets)."""
    settings = Settings()
    return FarmClient(os.environ.get("SDFARM_API_URL", settings.api_url), settings.api_key)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=None, separators=(",", ":")))


def _outcome(status: dict[str, Any]) -> int:
    return EXIT_OK if status["counts"]["succeeded"] == status["total"] else EXIT_FAILED


# -- submit ---------------------------------------------------------------------------------------


def _defaults(args: argparse.Namespace) -> dict[str, Any]:
    values = {name: getattr(args, name) for name in JOB_OPTIONS}
    values["negative_prompt"] = args.negative_prompt
    return {key: value for key, value in values.items() if value is not None}


def _file_jobs(path: Path, defaults: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Jobs from a file, read lazily (a 100,000-line file streams): .jsonl/.ndjson or text."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise InvalidJob(f"cannot read {path}: {e}") from e
    structured = path.suffix in (".jsonl", ".ndjson")
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if not structured:
                yield {**defaults, "prompt": line.strip()}
                continue
            try:
                job = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidJob(f"{path}:{number}: not valid JSON ({e.msg})") from e
            if not isinstance(job, dict):
                raise InvalidJob(f"{path}:{number}: each line must be a JSON object")
            yield {**defaults, **job}


def _png_infotexts(folder: Path) -> list[tuple[Path, str]]:
    """Each PNG, WebP or JPEG of `folder` (by name) with its A1111 `parameters` text; InvalidJob
    naming a file that is not such an image or holds none."""
    if not folder.is_dir():
        raise InvalidJob(f"--from-png: {folder} is not a folder")
    found = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            text = read_png_metadata(path.read_bytes()).get("parameters")
        except OSError as e:  # PIL's UnidentifiedImageError is one
            raise InvalidJob(f"--from-png: cannot read {path}: {e}") from e
        if not text:
            raise InvalidJob(f"--from-png: {path} holds no A1111 `parameters` text")
        found.append((path, text))
    if not found:
        raise InvalidJob(f"--from-png: no .png, .webp or .jpg files in {folder}")
    return found


def _submit_pngs(
    farm: FarmClient, folder: Path, defaults: dict[str, Any], options: dict[str, Any]
) -> Submitted:
    """One batch of the jobs the PNGs' infotexts describe; a refusal names the file."""
    pngs = _png_infotexts(folder)
    try:
        return farm.submit(a1111=[text for _, text in pngs], defaults=defaults, **options)
    except InvalidJob as e:
        index = next((p.get("job") for p in e.details if isinstance(p.get("job"), int)), None)
        if index is None or not 0 <= index < len(pngs):
            raise
        raise InvalidJob(f"{pngs[index][0]}: {e}", e.details) from e


def _submit(args: argparse.Namespace) -> int:
    defaults = _defaults(args)
    from_png: Path | None = getattr(args, "from_png", None)
    if from_png is not None and (args.file is not None or args.prompt):
        raise InvalidJob("--from-png: give it alone, without a FILE or --prompt")
    if args.file is None and not args.prompt and from_png is None:
        raise InvalidJob("nothing to submit: give a FILE, --prompt TEXT or --from-png DIR")
    if args.file is not None and not args.file.is_file():
        raise InvalidJob(f"cannot read {args.file}: no such file")
    options = {
        "priority": args.priority,
        "callback_url": args.callback_url,
        "idempotency_key": args.idempotency_key,
    }
    with client() as farm:
        prompts = [{**defaults, "prompt": p} for p in args.prompt or []]
        if from_png is not None:
            submitted = _submit_pngs(farm, from_png, defaults, options)
        elif args.file is None:
            submitted = farm.submit(prompts, **options)
        else:
            # A file goes as NDJSON, streamed while it is read.
            jobs = _chain(prompts, _file_jobs(args.file, defaults))
            submitted = farm.submit_stream(jobs, **options)
        batch_id = submitted["batch_id"]
        note = (
            " (the earlier submission with this Idempotency-Key)" if submitted["replayed"] else ""
        )
        print(f"batch {batch_id}: {len(submitted['job_ids'])} jobs queued{note}", file=sys.stderr)
        if not args.wait:
            if args.json:
                _print_json(submitted)
            else:
                print(batch_id)
            return EXIT_OK
        return _wait_and_report(farm, batch_id, as_json=args.json, timeout_s=args.timeout)


def _chain(first: list[dict[str, Any]], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from first
    yield from rest


def _wait_and_report(
    farm: FarmClient, batch_id: str, *, as_json: bool, timeout_s: float | None
) -> int:
    status = views.wait_with_progress(farm, batch_id, timeout_s=timeout_s, quiet=as_json)
    if as_json:
        _print_json(status)
    else:
        views.print_results(farm, batch_id, status)
    return _outcome(status)


# -- reading --------------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    with client() as farm:
        if is_job_id(args.id):
            job = farm.job(args.id)
            print(json.dumps(job) if args.json else views.job_text(job))
            return EXIT_OK
        batch = farm.batch(_batch_id(args.id))
    print(json.dumps(batch) if args.json else views.batch_table(batch))
    return EXIT_OK


def _batches(args: argparse.Namespace) -> int:
    with client() as farm:
        batches = farm.batches(args.limit)
    print(json.dumps(batches) if args.json else views.batches_table(batches))
    return EXIT_OK


def _wait(args: argparse.Namespace) -> int:
    with client() as farm:
        return _wait_and_report(
            farm, _batch_id(args.batch_id), as_json=args.json, timeout_s=args.timeout
        )


def _fetch(args: argparse.Namespace) -> int:
    from producer.download import fetch_batch

    with client() as farm:
        batch_id = _batch_id(args.batch_id)
        status = farm.batch(batch_id)
        with views.file_progress(status["counts"]["succeeded"], quiet=args.json) as advance:
            report = fetch_batch(farm, batch_id, args.out, on_file=advance)
    summary = {
        "batch_id": batch_id,
        "out": str(args.out),
        "downloaded": len(report.downloaded),
        "already_intact": len(report.skipped),
        "manifest": str(report.manifest),
        "counts": status["counts"],
    }
    if args.json:
        _print_json(summary)
    else:
        print(
            f"{len(report.images)} images in {args.out} ({len(report.downloaded)} downloaded, "
            f"{len(report.skipped)} already intact), manifest {report.manifest}"
        )
    return EXIT_OK if len(report.images) == status["total"] else EXIT_FAILED


def _workers(args: argparse.Namespace) -> int:
    with client() as farm:
        workers = farm.workers()
    print(json.dumps(workers) if args.json else views.workers_table(workers))
    return EXIT_OK


def _manifest(args: argparse.Namespace) -> int:
    with client() as farm:
        for line in farm.manifest(_batch_id(args.batch_id)):
            print(json.dumps(line, separators=(",", ":")))
    return EXIT_OK


# -- changing your mind ---------------------------------------------------------------------------


def _cancel(args: argparse.Namespace) -> int:
    result: Mapping[str, Any]
    with client() as farm:
        if is_job_id(args.id):
            result = farm.cancel(args.id)
            text = f"job {args.id}: {result['state']} (was {result['was']})"
        else:
            result = farm.cancel_batch(_batch_id(args.id))
            text = (
                f"batch {args.id}: {result['cancelled']} queued jobs cancelled, "
                f"{result['stopping']} running jobs stopping"
            )
    if args.json:
        _print_json(result)
    else:
        print(text)
    return EXIT_OK


def _retry(args: argparse.Namespace) -> int:
    with client() as farm:
        batch_id = _batch_id(args.batch_id)
        result = farm.retry(batch_id)
        print(f"batch {batch_id}: {result['requeued']} jobs queued again", file=sys.stderr)
        if args.wait:
            return _wait_and_report(farm, batch_id, as_json=args.json, timeout_s=args.timeout)
    if args.json:
        _print_json(result)
    return EXIT_OK


def _batch_id(value: str) -> str:
    if not is_batch_id(value):
        raise InvalidJob(f"{value[:40]!r} is not a batch id (b followed by 20 hex digits)")
    return value


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "submit": _submit,
    "status": _status,
    "batches": _batches,
    "wait": _wait,
    "fetch": _fetch,
    "cancel": _cancel,
    "retry": _retry,
    "workers": _workers,
    "manifest": _manifest,
}
