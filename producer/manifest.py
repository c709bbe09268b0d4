"""A batch's manifest: one JSON line per job, in submit order — what was asked and what became of
it (job id, prompt, params, seed, model hash, object key, format and Content-Type, thumbnail key,
state, error).

The API streams it (`GET /v1/batches/{id}/manifest`) and the finisher stores the same lines next
to the images when the batch ends (`{prefix}/{batch_id}/manifest.ndjson`), so the images can be
handed to another tool without asking the farm again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from shared.image_formats import FORMATS
from shared.ledger import JobRecord, Ledger
from shared.storage import Storage

__all__ = ["MANIFEST_NAME", "manifest_key", "manifest_line", "manifest_lines", "write_manifest"]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.ndjson"
_PARAMS = ("model", "scheduler", "steps", "guidance", "width", "height")
PNG = FORMATS["png"]


def manifest_key(storage: Storage, batch_id: str) -> str:
    """Beside the images: the same prefix and batch folder as `shared.storage.image_key`."""
    return f"{storage.prefix.strip('/')}/{batch_id}/{MANIFEST_NAME}".lstrip("/")


def manifest_line(record: JobRecord) -> dict[str, Any]:
    """The manifest entry of one job record (see `producer.schemas.ManifestLine`)."""
    spec = record["spec"]
    result = record.result or {}
    fmt = FORMATS.get(str(result.get("format") or spec.get("output_format") or "png"), PNG)
    return {
        "job_id": record.job_id,
        "state": record.state,
        "prompt": spec["prompt"],
        "negative_prompt": spec.get("negative_prompt", ""),
        "params": {name: spec.get(name) for name in _PARAMS},
        "seed": spec["seed"],
        "model_hash": record.model_hash,
        "key": result.get("key"),
        "uri": result.get("uri"),
        "bytes": result.get("bytes"),
        # What the job asked for until it has an image; a job from before formats is a PNG.
        "format": fmt.name,
        "content_type": result.get("content_type") or fmt.mime,
        "thumbnail_key": result.get("thumbnail_key"),
        "error": record.error,
    }


def manifest_lines(ledger: Ledger, batch_id: str) -> Iterator[bytes]:
    """NDJSON lines, read from the ledger a slice at a time (a 100,000-job batch streams)."""
    for records in ledger.iter_jobs(batch_id):
        chunk = "".join(json.dumps(manifest_line(r), separators=(",", ":")) + "\n" for r in records)
        yield chunk.encode()


def write_manifest(ledger: Ledger, storage: Storage, batch_id: str) -> str:
    """Store the manifest next to the images; returns its key. Rewriting it is harmless."""
    key = manifest_key(storage, batch_id)
    data = b"".join(manifest_lines(ledger, batch_id))
    storage.put(key, data, "application/x-ndjson")
    log.info("batch %s: manifest stored at %s (%d bytes)", batch_id, key, len(data))
    return key
