"""Step 4 of a chunk: encode each rendered image and upload it, then report it.

1. Encode the PNG with A1111's `parameters` and the job's full spec embedded.
2. Upload it to its fixed key (`{prefix}/{batch_id}/{job_id}.png`), retrying with doubling
   pauses; a store that refuses is not retried.
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

import redis
from PIL import Image

from shared.config import Settings
from shared.errors import StorageError
from shared.ids import batch_of
from shared.ledger import Ledger
from shared.metadata import encode_png
from shared.storage import Storage, image_key
from worker.context import WorkerState
from worker.embeddings import ti_hashes_param, used_embeddings
from worker.loras import lora_params
from worker.models import LoadedModel
from worker.render import Rendered
from worker.report import Reporter

__all__ = ["put_with_retry", "store_rendered"]

log = logging.getLogger(__name__)


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
    keep_alive = [item.job.job_id for item in rendered]
    out = []
    for item in rendered:
        job_id = item.job.job_id
        # 1. Encode.
        key = image_key(storage.prefix, batch_of(job_id), job_id)
        spec = item.job.spec
        used = used_embeddings(model, (spec.prompt, spec.negative_prompt))  # for `TI hashes`
        data = encode_png(
            Image.fromarray(item.pixels),
            item.job.spec.model_dump(),
            model_name=model.name,
            model_hash=model.model_hash,
            extra={"job_id": job_id, "warnings": item.warnings},
            refiner_hash=refiner_hash,
            vae_hash=model.vae_hash,  # set when the job's VAE override is in place
            extra_params=[*lora_params(loras), *ti_hashes_param(used)],
        )
        # 2. Upload.
        try:
            renew = _renewer(ledger, worker_id, keep_alive)
            put_with_retry(storage, settings, state, key, data, renew=renew)
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
                # The LoRAs active in its pass, with their short hashes: the job's own set.
                **({"loras": loras} if loras else {}),
            },
            "timings": {**item.timings, "batch_rows": item.pass_rows},
            "model_hash": model.model_hash or "",
            "model_family": model.family,
            **({"refiner_hash": refiner_hash} if refiner_hash else {}),
            **({"ti_hashes": used} if used else {}),  # the embeddings its prompts named
            "finished_at": time.time(),
            "warnings": item.warnings,  # dropped prompt words, an fp32 VAE retry: shown by API, CLI
        }
        done = reporter.succeeded(job_id, fields)
        if done:
            state.images_done += 1
        out.append((job_id, done))
    return out


def put_with_retry(
    storage: Storage,
    settings: Settings,
    state: WorkerState,
    key: str,
    data: bytes,
    *,
    renew: Callable[[], None] | None = None,
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
            storage.put(key, data, "image/png")
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
