"""The LoRA check at submit: every LoRA a job names is in the library, and made for its model.

The library (`shared.lora_library`) is listed once per batch, and again only when its folder
changed, so a LoRA copied in while the API runs is accepted from its next submit on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.jobs import JobSpec
from shared.lora_library import LoraLibrary

__all__ = ["check_loras"]

_NAMES_LISTED = 20  # names of the library listed in a refusal


def check_loras(
    spec: JobSpec, library: LoraLibrary | None, families: Mapping[str, str]
) -> dict[str, Any] | None:
    """The problem with the job's LoRAs, if there is one (the library's names in the message)."""
    if not spec.loras:
        return None
    if library is None:
        return {
            "field": "loras",
            "message": "this farm has no LoRA library: set SDFARM_LORA_DIR on the API and the "
            "workers to use LoRAs",
        }
    model_family = families.get(str(spec.model))
    for index, lora in enumerate(spec.loras):
        found = library.get(lora.name)
        if found is None:
            return {
                "field": f"loras.{index}.name",
                "value": lora.name,
                "message": f"unknown LoRA {lora.name!r}; {_listing(library.names())}",
            }
        if model_family is not None and found.family is not None and found.family != model_family:
            return {
                "field": f"loras.{index}.name",
                "value": lora.name,
                "message": f"LoRA {lora.name!r} is for {found.family} models; {spec.model!r} is "
                f"{model_family}",
            }
    return None


def _listing(names: list[str]) -> str:
    if not names:
        return "the library is empty"
    more = f" (and {len(names) - _NAMES_LISTED} more)" if len(names) > _NAMES_LISTED else ""
    return f"the library holds: {', '.join(names[:_NAMES_LISTED])}{more}"
