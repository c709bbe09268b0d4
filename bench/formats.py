"""Bytes per image, and encode time, in each output format, with sdfarm's own encoders.

    python bench/formats.py [--photo PATH] [--sizes 512,1024]

The tiny test model renders noise, which no format compresses, so the table uses synthetic
content of three kinds (and a photograph, when `--photo` names one):

- `noise`: uniform random RGB, what the tiny model's outputs look like (the worst case);
- `smooth`: gradients, discs and bands with soft edges, nothing finer (a flat illustration);
- `photo-like`: `smooth` plus blurred texture of several scales and a little grain (sigma 2),
  closer to what SD makes of a photographic prompt;
- `photo`: the file `--photo` names, centre-cropped to a square and resized.

Each encode carries the metadata a farm job carries (the infotext and the JSON record), so the
bytes are what the store holds. Writes bench/results/formats.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from shared.image_formats import thumbnail_webp
from shared.jobs import JobSpec
from shared.metadata import encode_image

RESULTS = Path(__file__).parent / "results" / "formats.json"
# (label, output_format, quality): the defaults first, then the lossy settings one would pick.
VARIANTS = [
    ("png", "png", None),
    ("webp lossless", "webp", None),
    ("webp q90", "webp", 90),
    ("webp q80", "webp", 80),
    ("jpeg q90 (default)", "jpeg", 90),
    ("jpeg q80", "jpeg", 80),
]


def noise(side: int, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def smooth(side: int, rng: np.random.Generator) -> Image.Image:
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.8 - 0.5 * x * y], axis=-1)
    for _ in range(12):  # discs of random colour, soft edges below
        cx, cy, r = rng.random(3) * [1, 1, 0.25] + [0, 0, 0.05]
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        rgb[inside] = rng.random(3)
    rgb[(np.sin(y * 40 + x * 9) > 0.95)] *= 0.7  # a few thin bands
    image = Image.fromarray((rgb * 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(side / 512))


def photo_like(side: int, rng: np.random.Generator) -> Image.Image:
    base = np.asarray(smooth(side, rng)).astype(np.float32)
    for scale in (4, 16, 64):  # texture of several sizes: foliage, fabric, skin
        small = rng.normal(0, 1, (max(side // scale, 2),) * 2 + (3,)).astype(np.float32)
        texture = Image.fromarray(((small + 4) * 32).clip(0, 255).astype(np.uint8))
        big = np.asarray(texture.resize((side, side), Image.Resampling.BICUBIC), np.float32)
        base += (big - 128) * (0.35 * 16 / scale**0.5 / 4)
    base += rng.normal(0, 2, base.shape)  # sensor-like grain
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def photo(path: Path) -> Callable[[int, np.random.Generator], Image.Image]:
    def load(side: int, _: np.random.Generator) -> Image.Image:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        short = min(rgb.size)
        left, top = (rgb.width - short) // 2, (rgb.height - short) // 2
        square = rgb.crop((left, top, left + short, top + short))
        return square.resize((side, side), Image.Resampling.LANCZOS)

    return load


def measure(image: Image.Image, output_format: str, quality: int | None) -> tuple[int, float]:
    spec = JobSpec(
        prompt="a photograph of a lighthouse at dusk, golden hour, 35mm, highly detailed",
        negative_prompt="blurry, lowres",
        model="sd15",
        seed=1234,
        width=image.width,
        height=image.height,
        output_format=output_format,  # type: ignore[arg-type]
        quality=quality,
    ).model_dump()
    start = time.perf_counter()
    data = encode_image(image, spec, model_name="sd15", model_hash="0123456789", extra={})
    return len(data), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, help="a photograph to measure as well")
    parser.add_argument("--sizes", default="512,1024")
    args = parser.parse_args()
    contents: dict[str, Callable[[int, np.random.Generator], Image.Image]] = {
        "noise": noise,
        "smooth": smooth,
        "photo-like": photo_like,
    }
    if args.photo is not None:
        contents["photo"] = photo(args.photo)
    rows: list[dict[str, Any]] = []
    for side in (int(s) for s in args.sizes.split(",")):
        for name, make in contents.items():
            image = make(side, np.random.default_rng(0))
            for label, output_format, quality in VARIANTS:
                size, seconds = measure(image, output_format, quality)
                rows.append(
                    {"side": side, "content": name, "format": label, "bytes": size, "s": seconds}
                )
            start = time.perf_counter()
            thumb = thumbnail_webp(image, 256)
            rows.append(
                {
                    "side": side,
                    "content": name,
                    "format": "thumbnail (webp q80, 256 px)",
                    "bytes": len(thumb),
                    "s": time.perf_counter() - start,
                }
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1))
    print("| size | content | format | bytes | KiB | encode ms |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['side']}² | {row['content']} | {row['format']} | {row['bytes']:,} | "
            f"{row['bytes'] / 1024:,.0f} | {row['s'] * 1000:,.0f} |"
        )


if __name__ == "__main__":
    main()
