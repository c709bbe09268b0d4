"""A finished job's A1111 `parameters` text, rebuilt from the ledger for the API and dashboard.

The worker embeds the same text in the image (`shared.metadata.infotext`); this one is built
from what the ledger keeps: the spec, the model and refiner hashes and the LoRA hashes of its
pass. An embedding's `TI hashes` and a VAE override's hash are not kept there, so those two
settings are the only ones it can lack; pasted into A1111 (or submitted as `a1111`) it renders
the same job.
"""

from __future__ import annotations

from typing import Any

from shared.jobs import JobState
from shared.ledger import JobRecord
from shared.metadata import infotext

__all__ = ["job_infotext"]


def job_infotext(record: JobRecord) -> str | None:
    """The job's `parameters` text once it has succeeded; None before (or for a spec from before
    these fields were required)."""
    if record.state is not JobState.SUCCEEDED:
        return None
    spec: dict[str, Any] = record["spec"]
    result = record.result or {}
    loras: dict[str, str] = result.get("loras") or {}
    extra = []
    if loras:
        extra.append(("Lora hashes", '"' + ", ".join(f"{n}: {h}" for n, h in loras.items()) + '"'))
    try:
        return infotext(
            spec,
            model_name=str(spec.get("model") or ""),
            model_hash=record.model_hash or None,
            refiner_hash=record.get("refiner_hash") or None,
            extra=extra,
        )
    except KeyError:
        return None
