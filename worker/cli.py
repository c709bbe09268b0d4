"""Worker-side commands of `sdfarm`: `worker`, `render`, `model make-tiny`.

They reach `sdfarm` through the `sdfarm.commands` entry points in pyproject.toml (one function
each, its docstring's first line the help), so `producer.cli` never imports this package. This
module imports no torch at the top: the commands pull it in when they run.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.config import Settings, parse_models
from shared.errors import InvalidJob, ModelLoadError, RenderFailed, WorkerSetupError
from shared.samplers import sampler_help

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


def _render_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdfarm render", description="Render one image in-process, with the worker's code."
    )
    p.add_argument(
        "--model",
        required=True,
        help="a diffusers model directory, or a single-file .safetensors/.ckpt checkpoint",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--width", type=int, help="pixels; the model's native size by default")
    p.add_argument("--height", type=int, help="pixels; the model's native size by default")
    p.add_argument(
        "--scheduler",
        default="lms",
        help=f"the sampler: {sampler_help()}",
    )
    p.add_argument("--init-image", type=Path, help="img2img: a PNG or JPEG of --width x --height")
    p.add_argument("--strength", type=float, help="img2img: (0, 1], how far to re-noise (0.75)")
    p.add_argument("--resize-init", action="store_true", help="resize --init-image to the size")
    p.add_argument(
        "--long-prompt",
        choices=("truncate", "chunk"),
        default="truncate",
        help="prompts over 75 tokens: cut with a warning, or encode in 75-token chunks",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    return p


def _model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdfarm model", description="Model tools.")
    sub = p.add_subparsers(dest="action", required=True)
    tiny = sub.add_parser("make-tiny", help="write a tiny random model of a real architecture")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--arch", choices=("sd1", "sdxl"), default="sd1", help="SD 1.x (default) or SDXL base"
    )
    tiny.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    tiny.add_argument(
        "--single-file",
        type=Path,
        metavar="FILE.safetensors",
        help="also write it as one checkpoint in A1111's layout, its configs in FILE.config/",
    )
    return p


def worker_command(argv: Sequence[str]) -> int:
    """Run a GPU worker process (or supervise one per GPU)."""
    return main("worker", argv)


def render_command(argv: Sequence[str]) -> int:
    """Render one image in-process, with the worker's code."""
    return main("render", argv)


def model_command(argv: Sequence[str]) -> int:
    """Model tools (make-tiny)."""
    return main("model", argv)


def main(command: str, argv: Sequence[str]) -> int:
    """Run one worker command on its arguments; returns the exit code."""
    try:
        if command == "worker":
            return _worker(_worker_parser().parse_args(argv), argv)
        if command == "render":
            return _render(_render_parser().parse_args(argv))
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


def _render(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from shared.families import read_model_facts
    from shared.jobs import JobSpec
    from shared.metadata import encode_png
    from shared.problems import problems_from
    from worker.levers import Levers, apply_levers
    from worker.models import load_model
    from worker.rows import pass_params, row_for
    from worker.sampler import render_pass

    img2img = {}
    if args.init_image is not None:
        try:
            data = args.init_image.read_bytes()
        except OSError as e:
            raise InvalidJob(f"--init-image: cannot read {args.init_image}: {e}") from e
        img2img = {"init_image": base64.b64encode(data).decode(), "resize_init": args.resize_init}
        if args.strength is not None:
            img2img["strength"] = args.strength
    elif args.strength is not None:
        raise InvalidJob("--strength: applies only with --init-image")
    facts = read_model_facts(args.model)  # from its JSON files: checked before loading the weights
    native = facts.native_px if facts is not None else 512
    try:
        spec = JobSpec(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            model=Path(args.model).stem,
            scheduler=args.scheduler,
            steps=args.steps,
            guidance=args.guidance,
            width=args.width or native,
            height=args.height or native,
            seed=args.seed,
            long_prompt=args.long_prompt,
            **img2img,
        )
    except ValidationError as e:
        problems = problems_from(e.errors(include_url=False))
        first = problems[0]
        option = "--" + str(first["field"]).replace(".", "-").replace("_", "-")
        raise InvalidJob(f"{option}: {first['message']}", problems) from e
    row = row_for(spec)
    model = load_model(spec.model or "model", args.model, device=args.device)
    apply_levers(model, Levers())  # a worker's default levers, so the image matches the farm's
    result = render_pass(model, [row], pass_params(spec))
    for warning in result.warnings[0]:
        print(f"warning: {warning}", file=sys.stderr)
    pixels = result.images[0]
    if pixels is None:
        raise RenderFailed(f"no image: {result.errors[0]}")
    from PIL import Image

    data = encode_png(
        Image.fromarray(pixels),
        spec.model_dump(),
        model_name=model.name,
        model_hash=model.model_hash,
        extra={"warnings": result.warnings[0]},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"{args.out} ({', '.join(f'{k} {v:.2f}s' for k, v in result.timings.items())})")
    return 0


def _model(args: argparse.Namespace) -> int:
    from worker.tiny import make_tiny

    if args.arch == "sdxl" and args.single_file is not None:
        print("error: --single-file is not available for --arch sdxl yet", file=sys.stderr)
        return 2
    path = make_tiny(args.dir, seed=args.seed, prediction_type=args.prediction_type, arch=args.arch)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote a tiny model to {path} ({size / 1e6:.1f} MB)")
    if args.single_file is not None:
        from worker.ldm_keys import write_single_file

        print(f"wrote {write_single_file(path, args.single_file)} (single-file checkpoint)")
    return 0
