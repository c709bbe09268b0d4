"""Starting a worker process: load the models once, then consume their queues with Celery.

SIGTERM is a warm shutdown: Celery takes no new message, the running chunk gets
`Settings.shutdown_grace_s` to finish, and a pass still rendering after that stops at its next
step and hands its jobs back to the ledger (`queued`, no attempt charged). So stopping a worker,
as a deploy or an autoscaler does, loses nothing and makes no one wait for a lease to lapse.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis
from celery.signals import worker_shutting_down

from shared.celery_app import make_celery, model_queue
from shared.config import Settings
from shared.errors import StorageError, StorageRefused, WorkerSetupError
from shared.ledger import Ledger
from shared.lora_s3 import open_lora_library
from shared.redis_client import connect
from shared.storage import Storage, open_storage
from worker.context import WorkerContext
from worker.embeddings import install_embeddings, read_embeddings
from worker.levers import Levers, apply_levers
from worker.lora_downloads import downloads_for
from worker.loras import LoraCache
from worker.models import LoadedModel, load_model
from worker.output import OutputPipeline
from worker.passes import warm_up
from worker.tasks import register_tasks
from worker.vaes import load_vaes

__all__ = ["load_models", "run_worker"]

log = logging.getLogger(__name__)


def load_models(
    models: dict[str, str],
    device: str,
    levers: Levers | None = None,
    embeddings_dir: Path | None = None,
    loras: LoraCache | None = None,
) -> dict[str, LoadedModel]:
    """Load every model before taking work, so a bad path fails the start, not the first job.

    Each model is loaded, gets the embeddings of `embeddings_dir` that fit it (worker/embeddings.py;
    before the levers, which may compile its text encoder), its speed levers (worker/levers.py)
    and, when its U-Net is compiled, renders every pass size once, so that no job waits for a
    compile.
    """
    levers = levers or Levers()
    embeddings = read_embeddings(embeddings_dir) if embeddings_dir is not None else []
    loaded = {}
    for name, path in models.items():
        log.info("loading model %s from %s on %s", name, path, device)
        model = load_model(name, path, device=device)
        install_embeddings(model, embeddings)
        if loras is not None and levers.compile_unet:
            loras.prepare(model)  # LoRA slots (worker/lora_slots.py), before the U-Net compiles
        apply_levers(model, levers)
        if levers.compile_unet or levers.compile_vae:
            warm_up(model, levers)
        loaded[name] = model
    return loaded


def check_storage(storage: Storage, worker_id: str) -> None:
    """Refuse to start when the image store refuses this worker; only warn when it is down.

    A worker that cannot store would render jobs only to hand them back: better to say why at
    start. A store that is merely unreachable may come back (compose starts services together),
    and the upload retries and hand-backs cover that.
    """
    try:
        storage.check(worker_id)
    except StorageRefused as e:
        raise WorkerSetupError(
            f"the image store refuses this worker, so it takes no work: {e}. Check "
            "SDFARM_STORAGE_URL, SDFARM_S3_ENDPOINT_URL and the AWS_* credentials"
        ) from e
    except StorageError as e:
        log.warning("image store unreachable at start (%s); finished jobs will wait for it", e)


def run_worker(
    settings: Settings, models: dict[str, str], *, device: str = "cpu", loglevel: str = "INFO"
) -> None:
    """Run one worker process (one per GPU) until it is told to stop."""
    if not models:
        raise SystemExit("no models to serve: pass --model NAME=PATH or set SDFARM_MODELS")
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url)
    check_storage(storage, worker_id)  # before the models: a refusal costs seconds, not minutes
    loras = _lora_cache(settings)
    loaded = load_models(
        models,
        device,
        Levers.from_settings(settings),
        embeddings_dir=settings.embeddings_dir,
        loras=loras,
    )
    vaes = load_vaes(settings.vaes, device, Levers.from_settings(settings))
    client = connect(settings)
    ledger = Ledger(client, status_ttl_s=settings.status_ttl_s, lease_s=settings.lease_s)
    # Stores chunk k while chunk k+1 renders; closed (drained) below, before the process ends.
    output = OutputPipeline(settings.output_depth)
    ctx = WorkerContext(
        settings=settings,
        ledger=ledger,
        storage=storage,
        models=loaded,
        worker_id=worker_id,
        output=output,
        vaes=vaes,
        loras=loras,
    )
    stop = threading.Event()
    try:
        app = make_celery(settings)
        register_tasks(app, ctx)
        worker_shutting_down.connect(_shutdown_deadline(ctx), weak=False)
        beat = threading.Thread(
            target=_heartbeat, args=(ctx, device, stop), name="heartbeat", daemon=True
        )
        beat.start()
        served = routes(loaded)
        queues = [model_queue(route) for route in served]
        log.info("worker %s serving %s on %s", worker_id, ", ".join(served), device)
        worker = app.Worker(
            hostname=f"{worker_id}@{socket.gethostname()}",
            pool="solo",
            concurrency=1,
            prefetch_multiplier=1,
            queues=queues,
            loglevel=loglevel,
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=False,  # worker-heartbeat events: Flower lists the worker
        )
        worker.start()
    finally:
        output.close()
        stop.set()
        ledger.workers.forget(worker_id)


def routes(models: Mapping[str, LoadedModel]) -> list[str]:
    """What a worker holding `models` serves: each model, and each SDXL base with each SDXL
    refiner it also holds (`base+refiner`, shared/jobs.py), both resident, so that a refined
    job renders on one worker in one go."""
    bases = [name for name, m in models.items() if m.family == "sdxl"]
    refiners = [name for name, m in models.items() if m.family == "sdxl-refiner"]
    return sorted(models) + [f"{base}+{refiner}" for base in bases for refiner in refiners]


def _shutdown_deadline(ctx: WorkerContext) -> Any:
    """The receiver of Celery's `worker_shutting_down` (sent from its SIGTERM handler)."""

    def receiver(**_: Any) -> None:
        # Runs inside a signal handler: only set a field; the sampling loop reads it each step.
        if ctx.state.stop_by is None:
            ctx.state.stop_by = time.monotonic() + ctx.settings.shutdown_grace_s

    return receiver


def _lora_cache(settings: Settings) -> LoraCache:
    """The worker's LoRAs: its library (a folder or S3), their downloads and adapters."""
    library = open_lora_library(
        settings.lora_dir,
        endpoint_url=settings.s3_endpoint_url,
        list_interval_s=settings.lora_list_interval_s,
    )
    downloads = downloads_for(library, settings.lora_disk_cache_dir, settings.lora_disk_cache_bytes)
    slots = settings.lora_slots if settings.compile_unet else 0  # only a compiled U-Net gains
    return LoraCache(
        library,
        settings.lora_cache_bytes,
        downloads,
        slots=slots,
        slot_rank=settings.lora_slot_rank,
    )


def _heartbeat(ctx: WorkerContext, device: str, stop: threading.Event) -> None:
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": device,
        "models": routes(ctx.models),  # the dispatcher sends a route only where it is served
        "model_hashes": {name: m.model_hash for name, m in ctx.models.items()},
        "model_families": {name: m.family for name, m in ctx.models.items()},
        "vaes": sorted(ctx.vaes),
    }
    interval = ctx.settings.worker_ttl_s / 3
    while True:
        try:
            state = {"current": ctx.state.current, "images_done": ctx.state.images_done}
            if ctx.loras is not None:  # loads, hits, evictions, downloads, for /metrics
                state |= ctx.loras.counts()
            ctx.ledger.workers.publish(ctx.worker_id, record | state, ctx.settings.worker_ttl_s)
        except redis.RedisError as e:
            log.warning("worker %s: heartbeat failed: %s", ctx.worker_id, e)
        if stop.wait(interval):
            return
