"""What the sampling loop takes and gives: a pass's rows, what they share, and its result."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PassParams", "PassResult", "Row"]


@dataclass(frozen=True)
class Row:
    """One job in a batched pass."""

    prompt: str
    negative_prompt: str
    seed: int
    guidance: float  # classifier-free guidance scale (A1111's "CFG scale")
    init_image: np.ndarray | None = None  # img2img: H x W x 3 uint8 at the pass's size
    long_prompt: str = "truncate"  # or "chunk": see worker/prompts.py
    prompt_syntax: str = "a1111"  # or "plain": the text goes to CLIP as it is
    clip_skip: int | None = None  # A1111's numbering: 1 (or None) is CLIP's last layer
    # SDXL's size conditioning, (height, width) and (top, left) as diffusers orders them; the
    # original size is the pass's size when None.
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    # SDXL refiner's conditioning, for the image and for its negative prompt.
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


@dataclass(frozen=True)
class PassParams:
    """What all rows of a pass share."""

    steps: int
    width: int
    height: int
    scheduler: str = "lms"
    strength: float | None = None  # img2img when set: every row then has an init image
    # With a refiner: the share of the schedule the base denoises before it hands over, (0, 1).
    refiner_switch_at: float | None = None
    # The base model's LoRAs, (name, weight) sorted by name, weight-0 ones left out, as in the
    # compatibility key; worker/loras.py activates them before the pass.
    loras: tuple[tuple[str, float], ...] = ()


@dataclass
class PassResult:
    """The images of a pass, in row order, what each row should know, and where time went."""

    images: list[np.ndarray | None]  # H x W x 3 uint8, None where the row failed
    timings: dict[str, float]  # seconds: "text_encoder", "unet" (the whole loop), "vae"
    warnings: list[list[str]] = field(default_factory=list)  # per row, for the job record
    errors: list[str | None] = field(default_factory=list)  # per row: why it has no image
