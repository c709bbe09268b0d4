"""The Celery app, its queue names and task names: the only place Celery is configured.

Choices for long GPU tasks, each for a reason:

- `task_acks_late` + `task_reject_on_worker_lost`: a chunk is acknowledged only after it ran, so a
  worker killed mid-chunk leaves the message to be delivered again.
- `worker_prefetch_multiplier = 1` and the solo pool (set by `sdfarm worker`): a GPU worker holds
  at most the chunk it renders; everything else stays in the queue for other workers.
- One `visibility_timeout` (`Settings.visibility_timeout_s`) in `broker_transport_options` and in
  `result_backend_transport_options`, longer than the longest chunk; redelivery after it is
  harmless (terminal jobs are skipped) but the ledger's leases, not this timeout, recover work
  from dead workers within `lease_s`.
- `broker_connection_retry_on_startup` and `broker_connection_max_retries = None`: a Redis restart
  never ends a worker; it reconnects and goes on consuming.
- `task_ignore_result` and no result backend: results live in the ledger, not in Celery.
- `worker_soft_shutdown_timeout`: on SIGTERM the running chunk gets this long to finish; a chunk
  cut short is handed back through the ledger (its jobs go back to `queued`).
- JSON serialisation only; a message holds job ids, never specs, so it stays small.
"""

from __future__ import annotations

from celery import Celery

from shared.config import Settings

__all__ = ["RENDER_CHUNK", "make_celery", "model_queue"]

RENDER_CHUNK = "sdfarm.render_chunk"  # args: (job_ids: list[str],) kwargs: {"model": str}


def model_queue(model: str) -> str:
    """Each model has its own queue, so a chunk only reaches a worker that holds its model."""
    return f"sdfarm.model.{model}"


def make_celery(settings: Settings, *, soft_shutdown_s: float = 60.0) -> Celery:
    app = Celery("sdfarm", broker=settings.redis_url, set_as_current=False)
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        result_backend=None,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_channel_error_retry=True,
        worker_soft_shutdown_timeout=soft_shutdown_s,
        worker_enable_soft_shutdown_on_idle=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue="sdfarm.default",
        task_create_missing_queues=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
