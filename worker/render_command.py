"""`sdfarm render`: one image in-process, with the worker's code (rows, levers, sampling loop).

It builds the same job spec, row and pass as the farm does, so its image is the farm's image for
the same job. Imports no torch at the top: the command pulls it in when it runs.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

from shared.errors import InvalidJob, RenderFailed
from shared.image_formats import OUTPUT_FORMATS, format_of_key
from shared.samplers import sampler_help

__all__ = ["render", "render_parser"]


def render_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--refiner", help="an SDXL refiner (directory or single file) that finishes")
    p.add_argument(
        "--refiner-switch-at", type=float, help="with --refiner: where it takes over, (0, 1) (0.8)"
    )
    p.add_argument(
        "--vae", help="a VAE (AutoencoderKL folder or LDM-layout single file) in the model's place"
    )
    p.add_argument(
        "--lora-dir",
        help="the LoRA library that <lora:NAME:W> tags name, a folder or s3://bucket/prefix "
        "(default: SDFARM_LORA_DIR)",
    )
    p.add_argument(
        "--embeddings-dir",
        type=Path,
        help="textual-inversion embeddings, used where the prompt names them "
        "(default: SDFARM_EMBEDDINGS_DIR)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        help="png, webp or jpeg, with A1111's parameters embedded (default: --out's extension, "
        "else png)",
    )
    p.add_argument("--quality", type=int, help="webp or jpeg: 1-100 (webp lossless without it)")
    return p


def _format_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The job's `output_format` (and `quality`): --format, else the one --out's extension
    names (`.webp`, `.jpg`), else png."""
    suffix = args.out.suffix.lower().lstrip(".")
    guessed = format_of_key(args.out.name).name if suffix in ("webp", "jpg", "jpeg") else "png"
    fields: dict[str, Any] = {"output_format": args.format or guessed}
    if args.quality is not None:
        fields["quality"] = args.quality
    return fields


def _refiner_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The job fields of --refiner and --refiner-switch-at; the refiner is named by its stem."""
    if args.refiner is None:
        if args.refiner_switch_at is not None:
            raise InvalidJob("--refiner-switch-at: applies only with --refiner")
        return {}
    name = Path(args.refiner).stem
    if name == Path(args.model).stem:
        name += "-refiner"
    fields: dict[str, Any] = {"refiner": name}
    if args.refiner_switch_at is not None:
        fields["refiner_switch_at"] = args.refiner_switch_at
    return fields


def _with_vae(
    args: argparse.Namespace, name: str | None, model: Any, refiner: Any
) -> tuple[Any, Any]:
    """The model (and refiner) with --vae in place of their VAE (worker/vaes.py), if given."""
    from worker.vaes import load_vaes, swap_vae

    if args.vae is None or name is None:
        return model, refiner
    vaes = load_vaes({name: args.vae}, args.device)
    model, refiner, problem = swap_vae(vaes, name, model, refiner)
    if problem is not None:
        raise InvalidJob(f"--vae: {problem}")
    return model, refiner


def _activate_loras(
    args: argparse.Namespace, model: Any, loras: tuple[tuple[str, float], ...]
) -> list[tuple[str, str]]:
    """The job's LoRAs active on `model`, from --lora-dir (or SDFARM_LORA_DIR); the PNG's
    `Lora hashes` setting for them."""
    if not loras:
        return []
    from shared.config import Settings
    from shared.lora_s3 import open_lora_library
    from worker.lora_downloads import downloads_for
    from worker.loras import LoraCache, lora_params

    settings = Settings()
    library = open_lora_library(
        args.lora_dir or settings.lora_dir, endpoint_url=settings.s3_endpoint_url, list_interval_s=0
    )
    if library is None:
        raise InvalidJob("the prompt names LoRAs: pass --lora-dir DIR or set SDFARM_LORA_DIR")
    for name, _ in loras:
        if library.get(name) is None:
            held = ", ".join(library.names())
            raise InvalidJob(f"unknown LoRA {name!r}; {library.location} holds: {held}")
    downloads = downloads_for(library, settings.lora_disk_cache_dir, settings.lora_disk_cache_bytes)
    return lora_params(LoraCache(library, 0, downloads).activate(model, loras))


def _embeddings(args: argparse.Namespace) -> list[Any]:
    """The embeddings of --embeddings-dir (or SDFARM_EMBEDDINGS_DIR); none when neither is set."""
    from shared.config import Settings
    from worker.embeddings import read_embeddings

    root = args.embeddings_dir or Settings().embeddings_dir
    return read_embeddings(root) if root is not None else []


def _load(name: str, path: str, device: str, embeddings: list[Any]) -> Any:
    """A model as a worker loads it: its embeddings installed, then a worker's default levers,
    so that the image matches the farm's."""
    from worker.embeddings import install_embeddings
    from worker.levers import Levers, apply_levers
    from worker.models import load_model

    model = load_model(name, path, device=device)
    install_embeddings(model, embeddings)
    apply_levers(model, Levers())
    return model


def render(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from shared.families import read_model_facts
    from shared.jobs import JobSpec
    from shared.metadata import encode_image
    from shared.problems import problems_from
    from worker.embeddings import ti_hashes_param, used_embeddings
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
    refined = _refiner_fields(args)
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
            vae=Path(args.vae).stem if args.vae is not None else None,
            **img2img,
            **refined,
            **_format_fields(args),
        )
    except ValidationError as e:
        problems = problems_from(e.errors(include_url=False))
        first = problems[0]
        option = "--" + str(first["field"]).replace(".", "-").replace("_", "-")
        option = option.replace("--output-format", "--format")
        raise InvalidJob(f"{option}: {first['message']}", problems) from e
    row = row_for(spec)
    embeddings = _embeddings(args)
    model = _load(spec.model or "model", args.model, args.device, embeddings)
    refiner = None
    if spec.refiner is not None:
        refiner = _load(spec.refiner, args.refiner, args.device, embeddings)
    model, refiner = _with_vae(args, spec.vae, model, refiner)
    lora_settings = _activate_loras(args, model, pass_params(spec).loras)
    result = render_pass(model, [row], pass_params(spec), refiner=refiner)
    for warning in result.warnings[0]:
        print(f"warning: {warning}", file=sys.stderr)
    pixels = result.images[0]
    if pixels is None:
        raise RenderFailed(f"no image: {result.errors[0]}")
    from PIL import Image

    texts = (spec.prompt, spec.negative_prompt)
    data = encode_image(
        Image.fromarray(pixels),
        spec.model_dump(),
        model_name=model.name,
        model_hash=model.model_hash,
        extra={"warnings": result.warnings[0]},
        refiner_hash=refiner.model_hash if refiner is not None else None,
        vae_hash=model.vae_hash,
        extra_params=[*lora_settings, *ti_hashes_param(used_embeddings(model, texts))],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"{args.out} ({', '.join(f'{k} {v:.2f}s' for k, v in result.timings.items())})")
    return 0
