"""Worker-side commands of `sdfarm`: `worker`, `render`, `model make-tiny`.

Imported only when one of them runs (it pulls torch); `producer.cli` hands over the arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.config import Settings, parse_models
from shared.errors import InvalidJob, ModelLoadError

__all__ = ["main"]

log = logging.getLogger(__name__)


def _worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdfarm worker", description="Run a worker process (one per GPU)."
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a model to keep resident (default: SDFARM_MODELS)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--loglevel", default="INFO")
    return p


def _render_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdfarm render", description="Render one image in-process, with the worker's code."
    )
    p.add_argument("--model", required=True, help="a diffusers model directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--scheduler", default="lms")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    return p


def _model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdfarm model", description="Model tools.")
    sub = p.add_subparsers(dest="action", required=True)
    tiny = sub.add_parser("make-tiny", help="write a tiny random model of the SD 1.x architecture")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    return p


def main(command: str, argv: Sequence[str]) -> int:
    try:
        if command == "worker":
            return _worker(_worker_parser().parse_args(argv))
        if command == "render":
            return _render(_render_parser().parse_args(argv))
        if command == "model":
            return _model(_model_parser().parse_args(argv))
    except (InvalidJob, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise SystemExit(f"unknown worker command {command!r}")


def _worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker

    settings = Settings()
    models: dict[str, str] = {}
    for entry in args.model:
        models.update(parse_models(entry))
    run_worker(settings, models or settings.models, device=args.device, loglevel=args.loglevel)
    return 0


def _render(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from shared.jobs import JobSpec
    from shared.metadata import encode_png
    from worker.models import load_model
    from worker.sampler import PassParams, Row, render_pass

    try:
        spec = JobSpec(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            model=Path(args.model).name,
            scheduler=args.scheduler,
            steps=args.steps,
            guidance=args.guidance,
            width=args.width,
            height=args.height,
            seed=args.seed,
        )
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        raise InvalidJob(f"--{'-'.join(str(p) for p in first['loc'])}: {first['msg']}") from e
    assert spec.seed is not None
    model = load_model(spec.model or "model", args.model, device=args.device)
    params = PassParams(
        steps=spec.steps, width=spec.width, height=spec.height, scheduler=spec.scheduler
    )
    row = Row(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        seed=spec.seed,
        guidance=spec.guidance,
    )
    result = render_pass(model, [row], params)
    from PIL import Image

    data = encode_png(
        Image.fromarray(result.images[0]),
        spec.model_dump(),
        model_name=model.name,
        model_hash=model.model_hash,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"{args.out} ({', '.join(f'{k} {v:.2f}s' for k, v in result.timings.items())})")
    return 0


def _model(args: argparse.Namespace) -> int:
    from worker.tiny import make_tiny

    path = make_tiny(args.dir, seed=args.seed, prediction_type=args.prediction_type)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote a tiny model to {path} ({size / 1e6:.1f} MB)")
    return 0
