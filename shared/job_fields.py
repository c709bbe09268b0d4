"""Field types of the job spec that other parts name too: prompts, model names, LoRA references,
and the one rule for numbers (finite, never a boolean, an int taken as a float)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

__all__ = ["MAX_LORAS", "LoraRef", "ModelName", "Prompt", "finite_number"]


def finite_number(value: Any, name: str) -> Any:
    """`value` for a float field called `name`: an int as a float; a boolean or a non-finite
    float refused with a message naming the field (pydantic's own check handles the rest)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, not a boolean")
    if isinstance(value, int):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


Prompt = Annotated[str, StringConstraints(max_length=100_000)]
MAX_LORAS = 16  # per job
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,128}$")]


class LoraRef(BaseModel):
    """A LoRA of the farm's library (by its file's stem) and the weight to apply it at."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: ModelName = Field(description="A LoRA of SDFARM_LORA_DIR, by its file's stem.")
    weight: float = Field(default=1.0, ge=-10.0, le=10.0, description="A1111's weight.")

    @field_validator("weight", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        return finite_number(value, "weight")
