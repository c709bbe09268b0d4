"""The Celery task: decode the message, call `process_chunk`. Nothing else lives here."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from shared.celery_app import RENDER_CHUNK
from shared.errors import InvalidJob
from shared.ids import is_job_id
from worker.chunk import process_chunk
from worker.context import WorkerContext

__all__ = ["register_tasks"]

log = logging.getLogger(__name__)


def register_tasks(app: Celery, ctx: WorkerContext) -> None:
    """Bind the render task to this process's resident models and ledger."""

    @app.task(name=RENDER_CHUNK, acks_late=True, reject_on_worker_lost=True, max_retries=0)
    def render_chunk(job_ids: Any, model: Any = None) -> dict[str, int]:
        # Retries are the ledger's business (attempts, leases), never Celery's.
        if not isinstance(job_ids, list) or not all(
            isinstance(j, str) and is_job_id(j) for j in job_ids
        ):
            raise InvalidJob(f"render_chunk needs a list of job ids, got {job_ids!r:.200}")
        if not isinstance(model, str):
            raise InvalidJob(f"render_chunk needs a model name, got {model!r:.100}")
        ctx.ledger.wake()  # a queue slot opened: refill it
        outcome = process_chunk(ctx, job_ids, model)
        ctx.ledger.wake()
        return outcome.counts()
