"""What a worker process holds while it lives, and the few things about it that change.

`WorkerContext` is built once at start (`worker.main`) and never changes: settings, ledger,
storage, the resident models, the worker's id, the output pipeline. `WorkerState` is the small
mutable part, each field with the one writer named beside it. `ChunkOutcome` is what one chunk's
delivery did, returned by `worker.chunk.process_chunk`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import Settings
from shared.ledger import Ledger
from shared.storage import Storage
from worker.loras import LoraCache
from worker.models import LoadedModel
from worker.output import OutputPipeline
from worker.vaes import LoadedVae

__all__ = ["ChunkOutcome", "WorkerContext", "WorkerState"]


@dataclass
class WorkerState:
    """What changes while a worker runs; read by the heartbeat and the sampling loop."""

    # The job ids of the chunk rendering now (written by `process_chunk`, read by the heartbeat).
    current: list[str] = field(default_factory=list)
    # Images stored since start (written by `worker.report`, read by the heartbeat).
    images_done: int = 0
    # Set on SIGTERM (`worker.main`): a pass still rendering after this monotonic time stops at
    # its next step and its jobs are handed back.
    stop_by: float | None = None
    # After an upload spent all its tries the store counts as down until this monotonic time, so
    # later uploads try once and a chunk hands its images back in seconds (`worker.upload`).
    storage_down_until: float = 0.0


@dataclass(frozen=True)
class WorkerContext:
    """A worker process's resources for its whole life: settings, ledger, storage, models."""

    settings: Settings
    ledger: Ledger
    storage: Storage
    models: dict[str, LoadedModel]
    worker_id: str
    # Stores chunk k while chunk k+1 renders; None stores in line (tests, `sdfarm render`).
    output: OutputPipeline | None = None
    # The VAEs of SDFARM_VAES, by name: a job's `vae` decodes in its model's VAE's place.
    vaes: dict[str, LoadedVae] = field(default_factory=dict)
    state: WorkerState = field(default_factory=WorkerState)
    # The LoRAs loaded into the models, with their counters (worker/loras.py); None: this
    # worker has no LoRA library, and a chunk that names LoRAs fails.
    loras: LoraCache | None = None


@dataclass
class ChunkOutcome:
    """Which jobs of a chunk ended how, as far as this delivery knows when it returns."""

    claimed: list[str] = field(default_factory=list)  # moved to `running` by this delivery
    skipped: list[str] = field(default_factory=list)  # not queued here, or moved on by another
    succeeded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    # Rendered and handed to the output pipeline, which stores and reports them after return.
    storing: list[str] = field(default_factory=list)

    def add(self, job_id: str, state: str) -> None:
        """Record where a ledger move left the job ("" when the move was refused)."""
        where = {"queued": self.requeued, "": self.skipped}.get(state)
        if where is None:
            where = getattr(self, state)
        where.append(job_id)

    def counts(self) -> dict[str, int]:
        """How many jobs ended each way (the task's return value)."""
        return {name: len(ids) for name, ids in vars(self).items()}
