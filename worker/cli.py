"""Worker-side commands of `sdfarm`: `worker`, `render`, `model make-tiny`.

They reach `sdfarm` through the `sdfarm.commands` entry points in pyproject.toml (one function
each, its docstring's first line the help), so `producer.cli` never imports this package. This
module imports no torch at the top: the commands pull it in when they run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.config import Settings, parse_models
from shared.errors import InvalidJob, ModelLoadError, RenderFailed, WorkerSetupError

__all__ = ["main", "model_command", "render_command", "worker_command"]

log = logging.getLogger(__name__)


def _worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdfarm worker",
        description="Run a worker process, or with --gpus/--processes supervise one per GPU or "
        "CPU slot (crashed ones are restarted with backoff; SIGTERM drains them all).",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a model to keep resident (default: SDFARM_MODELS)",
    )
    p.add_argument("--device", default=None, help="cpu (the default), cuda or cuda:N")
    p.add_argument(
        "--gpus",
        default=None,
        metavar="all|0,1,...|claim:N",
        help="one supervised worker process per GPU, each with its own CUDA_VISIBLE_DEVICES; "
        "claim:N takes N GPUs no other worker of the farm holds (compose replicas)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="N",
        help="N supervised CPU worker processes (with --device cpu)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the U-Net and warm it up at start for SDFARM_COMPILE_SIZES",
    )
    p.add_argument("--loglevel", default="INFO")
    return p


def _model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdfarm model", description="Model tools.")
    sub = p.add_subparsers(dest="action", required=True)
    tiny = sub.add_parser("make-tiny", help="write a tiny random model of a real architecture")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--arch",
        choices=("sd1", "sdxl", "sdxl-refiner"),
        default="sd1",
        help="SD 1.x (default), SDXL base or SDXL refiner",
    )
    tiny.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    tiny.add_argument(
        "--single-file",
        type=Path,
        metavar="FILE.safetensors",
        help="also write it as one checkpoint in A1111's layout, its configs in FILE.config/",
    )
    lora = sub.add_parser("make-tiny-lora", help="write a random LoRA for a tiny model")
    lora.add_argument("model_dir", type=Path, help="a tiny model folder (make-tiny)")
    lora.add_argument("out", type=Path, metavar="OUT.safetensors")
    lora.add_argument("--layout", choices=("diffusers", "kohya"), default="kohya")
    lora.add_argument("--seed", type=int, default=0)
    return p


def worker_command(argv: Sequence[str]) -> int:
    """Run a GPU worker process (or supervise one per GPU)."""
    return main("worker", argv)


def render_command(argv: Sequence[str]) -> int:
    """Render one image in-process, with the worker's code."""
    return main("render", argv)


def model_command(argv: Sequence[str]) -> int:
    """Model tools (make-tiny, make-tiny-lora)."""
    return main("model", argv)


def main(command: str, argv: Sequence[str]) -> int:
    """Run one worker command on its arguments; returns the exit code."""
    try:
        if command == "worker":
            return _worker(_worker_parser().parse_args(argv), argv)
        if command == "render":
            from worker.render_command import render, render_parser

            return render(render_parser().parse_args(argv))
        if command == "model":
            return _model(_model_parser().parse_args(argv))
    except (InvalidJob, ModelLoadError, WorkerSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RenderFailed as e:  # the precision guard refused a NaN or black image
        print(f"error: {e}", file=sys.stderr)
        return 1
    raise SystemExit(f"unknown worker command {command!r}")


def _worker(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.gpus is not None or args.processes is not None:
        return _supervise(args, argv)
    from worker.main import run_worker

    settings = Settings()
    if args.compile:
        settings = settings.model_copy(update={"compile_unet": True})
    models: dict[str, str] = {}
    for entry in args.model:
        models.update(parse_models(entry))
    device = args.device or "cpu"
    run_worker(settings, models or settings.models, device=device, loglevel=args.loglevel)
    return 0


def _supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`--gpus` / `--processes`: this process only supervises; it never imports torch."""
    from worker.gpus import claim_count
    from worker.supervisor import Supervisor, child_worker_args, plan_children

    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(name)s %(message)s")
    gpus, claims = args.gpus, None
    if (count := claim_count(gpus)) is not None:
        from worker.gpu_claims import claim_gpus

        gpus, claims = claim_gpus(Settings(), count, os.environ)
    children = plan_children(
        gpus=gpus,
        processes=args.processes,
        device=args.device,
        worker_args=child_worker_args(argv),
        env=os.environ,
    )
    try:
        return Supervisor(children, keepalive=claims.renew if claims else None).run()
    finally:
        if claims is not None:
            claims.release()


def _model(args: argparse.Namespace) -> int:
    from worker.tiny import make_tiny

    if args.action == "make-tiny-lora":
        from worker.tiny_lora import make_tiny_lora

        out = make_tiny_lora(args.model_dir, args.out, layout=args.layout, seed=args.seed)
        print(f"wrote a tiny {args.layout} LoRA to {out} ({out.stat().st_size / 1e3:.0f} kB)")
        return 0

    path = make_tiny(args.dir, seed=args.seed, prediction_type=args.prediction_type, arch=args.arch)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote a tiny model to {path} ({size / 1e6:.1f} MB)")
    if args.single_file is not None:
        from worker.ldm_keys import write_single_file

        print(f"wrote {write_single_file(path, args.single_file)} (single-file checkpoint)")
    return 0
