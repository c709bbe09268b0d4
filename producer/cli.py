"""The `sdfarm` command. The client commands live in `producer.commands`; the worker commands
(`worker`, `render`, `model`) are the worker package's, found through the `sdfarm.commands`
entry points (pyproject.toml) and loaded only to run them or list them in `--help`, so this
module never imports worker code and the client-only install works without torch.

Exit codes:
    0  all jobs succeeded (or, for a command that only reads or asks, it did so)
    1  some jobs failed or were cancelled (or a wait timed out)
    2  bad input: a refused field (the message names it), an unknown id, a missing or wrong key
    3  cannot reach the farm (or the farm answered with a server error)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from producer.commands import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, HANDLERS
from producer.terminal import printable
from shared.config import Settings, parse_models
from shared.errors import AccessDenied, FarmUnreachable, InvalidJob, SdfarmError, UnknownId

__all__ = ["command_names", "main"]

# The entry-point group through which other packages (the worker) add subcommands to `sdfarm`.
COMMAND_GROUP = "sdfarm.commands"
_Subparsers = argparse._SubParsersAction  # what `add_subparsers` returns, for the `_add_*` below


def _plugin_commands() -> dict[str, EntryPoint]:
    """The subcommands installed packages register in `sdfarm.commands`, by name (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}


def _parser(describe: bool = False) -> argparse.ArgumentParser:
    """The whole command line; `describe` loads the plugin commands for their help lines."""
    parser = argparse.ArgumentParser(
        prog="sdfarm",
        description="An asynchronous render farm for Stable Diffusion.",
        epilog="Exit codes: 0 all succeeded, 1 some failed or were cancelled, 2 bad input, "
        "3 cannot reach the farm.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In this order, which is the order `sdfarm --help` lists them in.
    _add_server_commands(sub)
    _add_submit_command(sub)
    _add_batch_commands(sub)
    _add_up_command(sub)
    # Commands from other packages (the worker's): they parse their own options.
    for name, entry in sorted(_plugin_commands().items()):
        sub.add_parser(name, help=_describe(entry) if describe else None, add_help=False)
    return parser


def _add_server_commands(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("api", help="run the HTTP API (and a dispatcher)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-dispatcher", action="store_true", help="serve only; dispatch elsewhere")

    sub.add_parser("dispatcher", help="run a dispatcher alone (one is active across the farm)")


def _add_submit_command(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "submit", help="submit prompts (FILE: .txt one prompt a line, .jsonl one job a line)"
    )
    p.add_argument("file", nargs="?", type=Path)
    p.add_argument(
        "--from-png",
        type=Path,
        metavar="DIR",
        help="re-submit every PNG, WebP and JPEG in DIR as the job its A1111 `parameters` describe",
    )
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
        ("output-format", str),  # png, webp or jpeg
        ("quality", int),  # webp or jpeg, 1-100
    ):
        p.add_argument(f"--{name}", type=kind, help="applies to every job without its own")
    p.add_argument("--priority", type=int, help="0-9, 9 the most urgent (default 5)")
    p.add_argument("--callback-url", help="POSTed a signed summary when the batch ends")
    p.add_argument("--idempotency-key", help="repeat a submission safely: same key, same batch")
    _waiting(p)


def _add_batch_commands(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    """The client commands after `submit`: follow, fetch, cancel and retry batches; list workers."""
    p = sub.add_parser("status", help="show a batch (counts, queue position, ETA) or a job")
    p.add_argument("id", help="a batch id or a job id")
    _json(p)

    p = sub.add_parser("batches", help="list recent batches, newest first")
    p.add_argument("--limit", type=int, default=20)
    _json(p)

    p = sub.add_parser("wait", help="wait for a batch with a progress bar, then list its jobs")
    p.add_argument("batch_id")
    p.add_argument("--timeout", type=float, default=None, help="seconds")
    _json(p)

    p = sub.add_parser("fetch", help="download a batch's images and manifest (resumable)")
    p.add_argument("batch_id")
    p.add_argument("--out", type=Path, default=Path("out"))
    _json(p)

    p = sub.add_parser("cancel", help="cancel a job, or every job of a batch")
    p.add_argument("id", help="a batch id or a job id")
    _json(p)

    p = sub.add_parser("retry", help="queue a batch's failed and cancelled jobs again, same seeds")
    p.add_argument("batch_id")
    _waiting(p)

    p = sub.add_parser("workers", help="list live workers")
    _json(p)

    p = sub.add_parser("manifest", help="print a batch's manifest (NDJSON, one job a line)")
    p.add_argument("batch_id")


def _add_up_command(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="start a whole farm on this machine (Ctrl-C stops it)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--storage", choices=("s3", "file"), default="s3")
    p.add_argument("--port", type=int, default=None, help="API port (default: a free one)")
    p.add_argument("--state-dir", type=Path, default=Path(".sdfarm"))
    p.add_argument("--device", default="cpu")


def _describe(entry: EntryPoint) -> str:
    """A plugin command's help line: its function's docstring, or the extra it is missing."""
    try:
        command = entry.load()
    except ModuleNotFoundError as e:
        return f"needs {_install_hint(entry)} ({e})"
    lines = (command.__doc__ or "").strip().splitlines()
    if not lines:
        return f"from {entry.module}"
    return lines[0][:1].lower() + lines[0][1:].rstrip(".")  # in the style of the lines above


def _install_hint(entry: EntryPoint) -> str:
    dist = entry.dist.name if entry.dist is not None else "sdfarm"
    extras = ",".join(entry.extras)
    return f"pip install '{dist}[{extras}]'" if extras else f"pip install '{dist}'"


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON on stdout, nothing else")


def _waiting(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="show a progress bar until the batch ends")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    _json(p)


def command_names() -> set[str]:
    """Every subcommand of `sdfarm` (the compose file's commands are checked against these)."""
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    plugins = _plugin_commands()
    args, rest = _parser(describe=_asks_for_help(argv)).parse_known_args(argv)
    if args.command not in plugins and rest:
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command in plugins:
        return _run_plugin(plugins[args.command], rest)
    if args.command in _SERVER_COMMANDS:
        logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    handler = _SERVER_COMMANDS.get(args.command) or HANDLERS[args.command]
    try:
        return handler(args)
    except (InvalidJob, UnknownId, AccessDenied) as e:
        details = e.details[1:5] if isinstance(e, InvalidJob) else []
        _error(str(e), [p.get("message", "") for p in details])
        return EXIT_BAD_INPUT
    except FarmUnreachable as e:
        _error(str(e))
        return EXIT_UNREACHABLE
    except (SdfarmError, TimeoutError) as e:
        _error(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


def _asks_for_help(argv: Sequence[str]) -> bool:
    """`sdfarm -h` (before any command): only then are the plugin commands loaded to list them."""
    for arg in argv:
        if not arg.startswith("-"):
            return False
        if arg in ("-h", "--help"):
            return True
    return False


def _run_plugin(entry: EntryPoint, rest: list[str]) -> int:
    """Run a command another package registered; a dependency it lacks names the extra."""
    try:
        command: Callable[[Sequence[str]], int] = entry.load()
        return command(rest)
    except ModuleNotFoundError as e:
        own = ("shared", "producer", entry.module.partition(".")[0])
        if e.name is None or e.name.partition(".")[0] in own:
            raise  # a module of sdfarm's own missing is a broken install, not a missing extra
        _error(
            f"`sdfarm {entry.name}` needs {e.name}, which is not installed; "
            f"install the extra it comes with: {_install_hint(entry)}"
        )
        return EXIT_BAD_INPUT


def _error(message: str, more: Sequence[str] = ()) -> None:
    print(f"error: {printable(message)}", file=sys.stderr)  # messages echo what was sent
    for line in more:
        print(f"       {printable(line)}", file=sys.stderr)


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

    from producer.dispatcher import Dispatcher
    from shared.celery_app import make_celery
    from shared.ledger import Ledger
    from shared.redis_client import connect

    settings = Settings()
    ledger = Ledger(
        connect(settings),
        status_ttl_s=settings.status_ttl_s,
        lease_s=settings.lease_s,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Dispatcher(settings, ledger, make_celery(settings)).run(stop)
    return EXIT_OK


def _up(args: argparse.Namespace) -> int:
    from producer.local_session import run_local_farm

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


_SERVER_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "api": _api,
    "dispatcher": _dispatcher,
    "up": _up,
}
