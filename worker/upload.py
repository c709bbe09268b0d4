"""Step 4 of a chunk: encode each rendered image and upload it, then report it.

1. Encode the image in the job's format (PNG, WebP or JPEG) with A1111's `parameters` and the
   job's full spec embedded, and its WebP thumbnail (`thumbnail_px` on the longest side).
2. Upload both to their fixed keys (`{prefix}/{batch_id}/{job_id}.png|webp|jpg`, and
   `{prefix}/{batch_id}/thumbs/{job_id}.webp`), retrying with doubling pauses; a store that
   refuses is not retried. A job is stored once both are.
3. Report: `succeeded` once the object is stored; otherwise the store's failure goes to
   `report.storage_failed`, which hands the job back or fails it.

In a worker this runs on the output pipeline's thread while the next chunk renders; the leases of
the chunk are renewed while an upload waits to try again, since the chunk monitor has stopped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import redis
from PIL import Image

from shared.config import Settings
from shared.errors import StorageError
from shared.ids import batch_of
from shared.image_formats import FORMATS, ImageFormat, thumbnail_webp
from shared.ledger import Ledger
from shared.metadata import encode_image
from shared.object_keys import thumbnail_key
from shared.storage import Storage, image_key
from worker.context import WorkerState
from worker.embeddings import ti_hashes_param, used_embeddings
from worker.loras import lora_params
from worker.models import LoadedModel
from worker.render import Rendered
from worker.report import Reporter

__all__ = ["put_with_retry", "store_rendered"]

log = logging.getLogger(__name__)

WEBP = FORMATS["webp"].mime  # thumbnails are WebP whatever the image's format


@dataclass(frozen=True)
class _Encoded:
    """One job's objects to store: the image, then its thumbnail (when thumbnails are on)."""

    image: tuple[str, bytes, ImageFormat]
    thumbnail: tuple[str, bytes] | None
    embeddings: dict[str, str]  # the textual inversions its prompts named, with their hashes


def store_rendered(
    reporter: Reporter,
    storage: Storage,
    model: LoadedModel,
    rendered: Sequence[Rendered],
    *,
    state: WorkerState,
    refiner: LoadedModel | None = None,
    lora_hashes: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """Store and report every rendered image; returns (job id, state afterwards) pairs.
    `lora_hashes` are the A1111 short hashes of the LoRAs the pass had active, by name."""
    refiner_hash = refiner.model_hash if refiner is not None else None
    loras = dict(lora_hashes or {})
    ledger, settings, worker_id = reporter.ledger, reporter.settings, reporter.worker_id
    renew = _renewer(ledger, worker_id, [item.job.job_id for item in rendered])
    out = []
    for item in rendered:
        job_id = item.job.job_id
        # 1. Encode.
        encoded = _encode(
            item,
            model,
            storage.prefix,
            thumbnail_px=settings.thumbnail_px,
            refiner_hash=refiner_hash,
            loras=loras,
        )
        (key, data, fmt), thumb = encoded.image, encoded.thumbnail
        # 2. Upload.
        try:
            put_with_retry(storage, settings, state, key, data, renew=renew, content_type=fmt.mime)
            if thumb is not None:
                put_with_retry(storage, settings, state, *thumb, renew=renew, content_type=WEBP)
        except StorageError as e:
            what = "its image could not be stored"
            out.append((job_id, reporter.storage_failed(job_id, e, what)))
            continue
        # 3. Report.
        fields = {
            "result": {
                "key": key,
                "uri": storage.describe(key),
                "bytes": len(data),
                "format": fmt.name,
                "content_type": fmt.mime,
                **({"thumbnail_key": thumb[0]} if thumb is not None else {}),
                # The LoRAs active in its pass, with their short hashes: the job's own set.
                **({"loras": loras} if loras else {}),
            },
            "timings": {**item.timings, "batch_rows": item.pass_rows},
            "model_hash": model.model_hash or "",
            "model_family": model.family,
            **({"refiner_hash": refiner_hash} if refiner_hash else {}),
            # the embeddings its prompts named
            **({"ti_hashes": encoded.embeddings} if encoded.embeddings else {}),
            "finished_at": time.time(),
            "warnings": item.warnings,  # dropped prompt words, an fp32 VAE retry: shown by API, CLI
        }
        done = reporter.succeeded(job_id, fields)
        if done:
            state.images_done += 1
        out.append((job_id, done))
    return out


def _encode(
    item: Rendered,
    model: LoadedModel,
    prefix: str,
    *,
    thumbnail_px: int,
    refiner_hash: str | None,
    loras: dict[str, str],
) -> _Encoded:
    """The job's image in its format, with its metadata, and its thumbnail (0 px: none)."""
    job_id, spec = item.job.job_id, item.job.spec
    fmt = FORMATS[spec.output_format]
    used = used_embeddings(model, (spec.prompt, spec.negative_prompt))  # for `TI hashes`
    pixels = Image.fromarray(item.pixels)
    data = encode_image(
        pixels,
        spec.model_dump(),
        model_name=model.name,
        model_hash=model.model_hash,
        extra={"job_id": job_id, "warnings": item.warnings},
        refiner_hash=refiner_hash,
        vae_hash=model.vae_hash,  # set when the job's VAE override is in place
        extra_params=[*lora_params(loras), *ti_hashes_param(used)],
    )
    key = image_key(prefix, batch_of(job_id), job_id, fmt.extension)
    thumb = None
    if thumbnail_px:
        thumb = (
            thumbnail_key(prefix, batch_of(job_id), job_id),
            thumbnail_webp(pixels, thumbnail_px),
        )
    return _Encoded((key, data, fmt), thumb, used)


def put_with_retry(
    storage: Storage,
    settings: Settings,
    state: WorkerState,
    key: str,
    data: bytes,
    *,
    renew: Callable[[], None] | None = None,
    content_type: str = "image/png",
) -> None:
    """Upload with retries and doubling pauses; StorageError once the tries are spent.

    A refusal (`retryable` False) is raised at once: waiting will not fix credentials. After one
    upload spent its tries the store counts as down for a while, and later uploads try once, so a
    chunk hands its images back in seconds rather than minutes. `renew` runs before each pause.
    """
    tries = 1 if time.monotonic() < state.storage_down_until else settings.storage_put_attempts
    pause_s = settings.storage_backoff_s
    for attempt in range(1, tries + 1):
        try:
            storage.put(key, data, content_type)
        except StorageError as e:
            if not e.retryable:
                raise
            if attempt == tries:
                state.storage_down_until = time.monotonic() + settings.storage_backoff_s * 2**tries
                raise
            log.warning(
                "%s: upload try %d of %d failed (%s); next in %.1f s",
                key,
                attempt,
                tries,
                e,
                pause_s,
            )
            if renew is not None:
                renew()
            time.sleep(pause_s)
            pause_s *= 2
        else:
            state.storage_down_until = 0.0
            return


def _renewer(ledger: Ledger, worker_id: str, job_ids: list[str]) -> Callable[[], None]:
    def renew() -> None:
        # The reconciler would charge an attempt for a lease that lapsed while the store was down.
        with contextlib.suppress(redis.RedisError):
            ledger.renew_leases(worker_id, job_ids)

    return renew
