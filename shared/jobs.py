"""The job spec and its validation (job states: shared/job_states.py, re-exported here).

A job spec is validated once, where it enters (API, CLI, `producer.submit`), and again by the worker
when it decodes the stored spec; both use these models, so the rules live in one place.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.image_formats import MAX_JPEG_PROMPT_CHARS, OutputFormatName
from shared.init_images import MAX_INIT_IMAGE_CHARS, check_init_image
from shared.job_fields import MAX_LORAS, LoraRef, ModelName, Prompt, finite_number
from shared.job_states import TERMINAL_STATES, JobState
from shared.prompt_tags import lora_tags_to_field
from shared.samplers import SAMPLER_IDS, sampler_help

__all__ = [
    "DEFAULT_PRIORITY",
    "MAX_PRIORITY",
    "SCHEDULERS",
    "TERMINAL_STATES",
    "JobSpec",
    "JobState",
    "LoraRef",
]

# Sampler names a job may ask for, from the one table of samplers (shared/samplers.py).
SCHEDULERS: tuple[str, ...] = SAMPLER_IDS
if TYPE_CHECKING:
    SchedulerName = str  # a Literal of the table's ids, which a type checker cannot compute
else:
    SchedulerName = Literal[SCHEDULERS]  # pydantic names every allowed id when it refuses one
DEFAULT_STRENGTH = 0.75  # img2img's strength when a job gives none (A1111's default)
MAX_SEED = 2**32 - 1  # A1111's range, so a seed read off an image works there too
MAX_SIDE = 2048  # pixels; a 2048x2048 SD 1.x image already needs ~20 GB without tiling
MAX_STEPS = 150
MAX_PRIORITY = 9  # batch priority runs 0..9; 9 is the most urgent
MAX_CONDITIONING_PX = 8192  # SDXL's size conditioning: numbers the U-Net embeds, not pixels made
DEFAULT_PRIORITY = 5  # the middle, so that background work can ask for less
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")  # a model name, as shared/config.py allows them
# SDXL's refiner, as A1111 and diffusers default it: the base denoises the first 80 % of the noise
# schedule; the refiner's aesthetic-score conditioning is 6 for the image and 2.5 for its negative.
DEFAULT_REFINER_SWITCH_AT = 0.8
DEFAULT_AESTHETIC_SCORE = 6.0
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5


class JobSpec(BaseModel):
    """One image to render. Unset `model` and `seed` are filled in at submit, never at render."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: Prompt = Field(min_length=1, description="What to draw.")
    negative_prompt: Prompt = Field(default="", description="What to steer away from.")
    model: str | None = Field(default=None, description="A configured model name.")
    scheduler: SchedulerName = Field(default="lms", description=f"Sampler: {sampler_help()}.")
    steps: int = Field(default=30, ge=1, le=MAX_STEPS, description="Denoising steps.")
    guidance: float = Field(default=7.5, ge=1.0, le=30.0, description="Classifier-free guidance.")
    width: int = Field(default=512, ge=64, le=MAX_SIDE, description="Pixels, a multiple of 8.")
    height: int = Field(default=512, ge=64, le=MAX_SIDE, description="Pixels, a multiple of 8.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Fixed at submit.")
    # img2img fields come after width and height: their validators check against them.
    resize_init: bool = Field(
        default=False, description="img2img: resize init_image to width x height."
    )
    init_image: str | None = Field(
        default=None,
        max_length=MAX_INIT_IMAGE_CHARS,
        description="img2img: a PNG or JPEG as `upload:TENANT/sha256:HEX` (POST /v1/uploads), "
        "base64 data (stored at submit; the job keeps its reference), or an s3://bucket/key "
        "under the farm's uploads or SDFARM_INIT_IMAGE_PREFIXES.",
    )
    strength: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=f"img2img: how far the init image is re-noised, (0, 1]; {DEFAULT_STRENGTH} "
        "when unset.",
    )
    long_prompt: Literal["truncate", "chunk"] = Field(
        default="truncate",
        description="Prompts over CLIP's 75 tokens: cut (with a warning) or encode in chunks.",
    )
    prompt_syntax: Literal["a1111", "plain"] = Field(
        default="a1111",
        description="a1111: emphasis `(word:1.3)`, `[word]`, `BREAK` and `<lora:NAME:W>` tags "
        "as A1111 reads them; plain: the text goes to CLIP as it is.",
    )
    loras: list[LoraRef] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description="LoRAs to apply; `<lora:NAME:W>` tags in the prompt end up here too.",
    )
    clip_skip: int | None = Field(
        default=None,
        ge=1,
        le=12,
        description="A1111's clip skip: 1 is CLIP's last layer (diffusers' clip_skip=k is k+1).",
    )
    vae: ModelName | None = Field(default=None, description="A VAE of SDFARM_VAES, by name.")
    # SDXL's size conditioning, per job (jobs with different values still share a pass).
    original_width: int | None = Field(
        default=None, ge=1, le=MAX_CONDITIONING_PX, description="SDXL: original size; `width`."
    )
    original_height: int | None = Field(
        default=None, ge=1, le=MAX_CONDITIONING_PX, description="SDXL: original size; `height`."
    )
    crop_left: int = Field(
        default=0, ge=0, le=MAX_CONDITIONING_PX, description="SDXL: crop top-left, pixels."
    )
    crop_top: int = Field(
        default=0, ge=0, le=MAX_CONDITIONING_PX, description="SDXL: crop top-left, pixels."
    )
    # SDXL's refiner: the base renders up to the switch point, the refiner finishes the image.
    refiner: str | None = Field(
        default=None, description="SDXL: a configured sdxl-refiner model that finishes the image."
    )
    refiner_switch_at: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description=f"SDXL: the share of the noise schedule the base denoises before the refiner "
        f"takes over, (0, 1); {DEFAULT_REFINER_SWITCH_AT} when unset.",
    )
    aesthetic_score: float | None = Field(
        default=None,
        ge=0.0,
        le=10.0,
        description=f"SDXL refiner: aesthetic-score conditioning; {DEFAULT_AESTHETIC_SCORE} when "
        "unset.",
    )
    negative_aesthetic_score: float | None = Field(
        default=None,
        ge=0.0,
        le=10.0,
        description=f"SDXL refiner: the negative prompt's aesthetic score; "
        f"{DEFAULT_NEGATIVE_AESTHETIC_SCORE} when unset.",
    )
    # How the image is stored (shared/image_formats.py); not part of the compatibility key.
    output_format: OutputFormatName = Field(
        default="png", description="png (lossless), webp or jpeg; each carries A1111's parameters."
    )
    quality: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="webp or jpeg: 1-100; unset, webp is lossless and jpeg is 90. Not for png.",
    )

    @field_validator(
        "guidance",
        "strength",
        "refiner_switch_at",
        "aesthetic_score",
        "negative_aesthetic_score",
        mode="before",
    )
    @classmethod
    def _finite(cls, value: Any, info: ValidationInfo) -> Any:
        return finite_number(value, str(info.field_name))

    @field_validator("init_image")
    @classmethod
    def _an_image_of_the_job_size(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            size = (info.data.get("width"), info.data.get("height"))
            check_init_image(value, size, resize=bool(info.data.get("resize_init")))
        return value

    @field_validator("strength")
    @classmethod
    def _strength_needs_an_init_image(
        cls, value: float | None, info: ValidationInfo
    ) -> float | None:
        if value is None:
            return value
        if "init_image" in info.data and info.data["init_image"] is None:  # absent: it failed
            raise ValueError(f"strength ({value:g}) applies only to jobs with an init_image")
        steps = info.data.get("steps")
        if steps is not None and int(steps * value) < 1:
            raise ValueError(
                f"strength {value:g} with {steps} steps leaves no denoising step; "
                f"strength x steps must be at least 1"
            )
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 but is {value}")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain something other than whitespace")
        return value

    @model_validator(mode="before")
    @classmethod
    def _lora_tags_to_loras(cls, data: Any) -> Any:
        """`<lora:NAME:W>` tags in an a1111-syntax prompt move to `loras` (shared/prompt_tags.py),
        so a tag and the field end up the same in the job record."""
        if not isinstance(data, dict) or data.get("prompt_syntax", "a1111") != "a1111":
            return data
        return lora_tags_to_field(data)

    @field_validator("loras")
    @classmethod
    def _each_lora_once(cls, value: list[LoraRef]) -> list[LoraRef]:
        names = [lora.name for lora in value]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"each LoRA may be named once; named more than once: {twice}")
        return value

    @field_validator("refiner")
    @classmethod
    def _a_model_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and value == info.data.get("model"):
            raise ValueError("refiner names the job's own model; name an sdxl-refiner model")
        if value is not None and not _NAME_RE.match(value):
            raise ValueError(f"refiner must be a model name, got {value[:80]!r}")
        return value

    @field_validator("refiner_switch_at", "aesthetic_score", "negative_aesthetic_score")
    @classmethod
    def _needs_a_refiner(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("refiner") is None:
            raise ValueError(f"{info.field_name} applies only to jobs with a refiner")
        return value

    @field_validator("output_format")
    @classmethod
    def _prompts_fit_the_format(cls, value: str, info: ValidationInfo) -> str:
        chars = len(info.data.get("prompt", "")) + len(info.data.get("negative_prompt", ""))
        if value == "jpeg" and chars > MAX_JPEG_PROMPT_CHARS:
            raise ValueError(
                f"jpeg holds prompts of at most {MAX_JPEG_PROMPT_CHARS} characters in all (its "
                f"EXIF is limited to 64 KiB), these have {chars}; use png or webp"
            )
        return value

    @field_validator("quality")
    @classmethod
    def _quality_needs_a_lossy_format(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("output_format") == "png":  # absent: it failed
            raise ValueError(
                f"quality ({value}) applies only to output_format webp or jpeg; png is lossless"
            )
        return value

    @model_validator(mode="after")
    def _refiner_after_the_init_image(self) -> JobSpec:
        """img2img with a refiner: the base must start above the switch point, or the refiner
        would denoise from more noise than the init image was given."""
        img2img = self.refiner is not None and self.init_image is not None
        if img2img and self.denoising_strength <= 1 - self.switch_at:
            raise ValueError(
                f"strength {self.denoising_strength:g} starts below the refiner's switch "
                f"point ({self.switch_at:g}); with a refiner, strength must be above "
                f"1 - refiner_switch_at = {1 - self.switch_at:g}"
            )
        return self

    @property
    def denoising_strength(self) -> float:
        """img2img's strength, the default when the job gave none."""
        return DEFAULT_STRENGTH if self.strength is None else self.strength

    @property
    def switch_at(self) -> float:
        """The refiner's switch point, the default when the job gave none."""
        if self.refiner_switch_at is None:
            return DEFAULT_REFINER_SWITCH_AT
        return self.refiner_switch_at
