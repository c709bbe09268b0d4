"""The `sdfarm` command. Worker commands (`worker`, `render`, `model`) live in `worker.cli` and
are imported only when run, so the client-only install works without torch.

Exit codes: 0 all succeeded, 1 some jobs failed or were cancelled, 2 bad input,
3 cannot reach the farm.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shared.config import Settings, parse_models
from shared.errors import FarmUnreachable, InvalidJob, SdfarmError, UnknownId

__all__ = ["command_names", "main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3
WORKER_COMMANDS = ("worker", "render", "model")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdfarm", description="An asynchronous render farm for Stable Diffusion."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("api", help="run the HTTP API (and a dispatcher)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-dispatcher", action="store_true", help="serve only; dispatch elsewhere")

    sub.add_parser("dispatcher", help="run a dispatcher alone (one is active across the farm)")

    p = sub.add_parser(
        "submit", help="submit prompts (FILE: .txt one prompt a line, .jsonl one job a line)"
    )
    p.add_argument("file", nargs="?", type=Path)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    for name, kind in (
        ("model", str),
        ("scheduler", str),
        ("steps", int),
        ("guidance", float),
        ("width", int),
        ("height", int),
        ("seed", int),
        ("negative-prompt", str),
    ):
        p.add_argument(f"--{name}", type=kind)
    p.add_argument(
        "--wait", action="store_true", help="wait with a progress bar until the batch ends"
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("status", help="show a batch or a job")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "wait", help="wait for a batch with a progress bar; exit 1 if any job failed"
    )
    p.add_argument("batch_id")
    p.add_argument("--timeout", type=float, default=None, help="seconds")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("fetch", help="download a batch's images (skips files already intact)")
    p.add_argument("batch_id")
    p.add_argument("--out", type=Path, default=Path("out"))

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")

    p = sub.add_parser("workers", help="list live workers")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("up", help="start a whole farm on this machine (Ctrl-C stops it)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--storage", choices=("s3", "file"), default="s3")
    p.add_argument("--port", type=int, default=None, help="API port (default: a free one)")
    p.add_argument("--state-dir", type=Path, default=Path(".sdfarm"))
    p.add_argument("--device", default="cpu")

    # Worker-side commands: their options are parsed by worker.cli.
    for name, help_text in (
        ("worker", "run a GPU worker process"),
        ("render", "render one image in-process"),
        ("model", "model tools (make-tiny)"),
    ):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_names() -> set[str]:
    """Every subcommand of `sdfarm` (the compose file's commands are checked against these)."""
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    if args.command not in WORKER_COMMANDS and rest:
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command in WORKER_COMMANDS:
        return _run_worker_command(args.command, rest)
    handler: Callable[[argparse.Namespace], int] = _HANDLERS[args.command]
    try:
        return handler(args)
    except InvalidJob as e:
        _error(str(e), [p.get("message", "") for p in e.details[1:5]])
        return EXIT_BAD_INPUT
    except UnknownId as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    except FarmUnreachable as e:
        _error(str(e))
        return EXIT_UNREACHABLE
    except SdfarmError as e:
        _error(str(e))
        return EXIT_FAILED


def _run_worker_command(command: str, rest: list[str]) -> int:
    try:
        from worker import cli as worker_cli
    except ImportError as e:
        _error(f"`sdfarm {command}` needs the worker extra: pip install 'sdfarm[worker]' ({e})")
        return EXIT_BAD_INPUT
    return worker_cli.main(command, rest)


def _error(message: str, more: Sequence[str] = ()) -> None:
    print(f"error: {message}", file=sys.stderr)
    for line in more:
        print(f"       {line}", file=sys.stderr)


# -- server commands ------------------------------------------------------------------------------


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from producer.api import create_app

    app = create_app(Settings(), run_dispatcher=not args.no_dispatcher)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return EXIT_OK


def _dispatcher(args: argparse.Namespace) -> int:
    import signal
    import threading

    import redis

    from producer.dispatcher import Dispatcher
    from shared.celery_app import make_celery
    from shared.ledger import Ledger

    settings = Settings()
    ledger = Ledger(
        redis.Redis.from_url(settings.redis_url),
        status_ttl_s=settings.status_ttl_s,
        lease_s=settings.lease_s,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Dispatcher(settings, ledger, make_celery(settings)).run(stop)
    return EXIT_OK


def _up(args: argparse.Namespace) -> int:
    from producer.local import run_local_farm

    models: dict[str, str] = {}
    for entry in args.model:
        models.update(parse_models(entry))
    return (
        run_local_farm(
            workers=args.workers,
            models=models,
            storage=args.storage,
            api_port=args.port,
            state_dir=args.state_dir.resolve(),
            device=args.device,
        )
        or EXIT_OK
    )


# -- client commands ------------------------------------------------------------------------------


def _client() -> Any:
    from producer.client import FarmClient

    settings = Settings()
    return FarmClient(os.environ.get("SDFARM_API_URL", settings.api_url), settings.api_key)


def _read_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    defaults = {
        key: value
        for key, value in {
            "model": args.model,
            "scheduler": args.scheduler,
            "steps": args.steps,
            "guidance": args.guidance,
            "width": args.width,
            "height": args.height,
            "seed": args.seed,
            "negative_prompt": args.negative_prompt,
        }.items()
        if value is not None
    }
    jobs: list[dict[str, Any]] = [{**defaults, "prompt": p} for p in args.prompt or []]
    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidJob(f"cannot read {args.file}: {e}") from e
        if args.file.suffix in (".jsonl", ".ndjson"):
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    job = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidJob(f"{args.file}:{number}: not valid JSON ({e.msg})") from e
                if not isinstance(job, dict):
                    raise InvalidJob(f"{args.file}:{number}: each line must be a JSON object")
                jobs.append({**defaults, **job})
        else:
            jobs += [
                {**defaults, "prompt": line.strip()} for line in text.splitlines() if line.strip()
            ]
    if not jobs:
        raise InvalidJob("nothing to submit: give a FILE or --prompt TEXT")
    return jobs


def _submit(args: argparse.Namespace) -> int:
    with _client() as client:
        submitted = client.submit(_read_jobs(args))
        if args.json and not args.wait:
            print(json.dumps(submitted))
            return EXIT_OK
        print(
            f"batch {submitted['batch_id']}: {len(submitted['job_ids'])} jobs queued",
            file=sys.stderr,
        )
        if not args.wait:
            print(submitted["batch_id"])
            return EXIT_OK
        return _wait_and_report(client, submitted["batch_id"], as_json=args.json)


def _status(args: argparse.Namespace) -> int:
    from producer import views

    with _client() as client:
        if "-" in args.id:
            job = client.job(args.id)
            print(json.dumps(job, indent=2) if args.json else views.job_text(job))
            return EXIT_OK
        batch = client.batch(args.id)
        print(json.dumps(batch) if args.json else views.batch_table(batch))
        return EXIT_OK


def _wait(args: argparse.Namespace) -> int:
    with _client() as client:
        return _wait_and_report(client, args.batch_id, as_json=args.json, timeout_s=args.timeout)


def _wait_and_report(
    client: Any, batch_id: str, *, as_json: bool, timeout_s: float | None = None
) -> int:
    from producer import views

    status = views.wait_with_progress(client, batch_id, timeout_s=timeout_s, quiet=as_json)
    if as_json:
        print(json.dumps(status))
    else:
        views.print_results(client, batch_id, status)
    return EXIT_OK if status["counts"]["succeeded"] == status["total"] else EXIT_FAILED


def _fetch(args: argparse.Namespace) -> int:
    with _client() as client:
        paths = client.fetch(args.batch_id, args.out)
        status = client.batch(args.batch_id)
    print(f"{len(paths)} images in {args.out}")
    return EXIT_OK if len(paths) == status["total"] else EXIT_FAILED


def _cancel(args: argparse.Namespace) -> int:
    with _client() as client:
        print(json.dumps(client.cancel(args.job_id)))
    return EXIT_OK


def _workers(args: argparse.Namespace) -> int:
    from producer import views

    with _client() as client:
        workers = client.workers()
    print(json.dumps(workers) if args.json else views.workers_table(workers))
    return EXIT_OK


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "api": _api,
    "dispatcher": _dispatcher,
    "up": _up,
    "submit": _submit,
    "status": _status,
    "wait": _wait,
    "fetch": _fetch,
    "cancel": _cancel,
    "workers": _workers,
}
