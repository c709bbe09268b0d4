"""The Celery app, its queue and task names: the only place Celery is configured.

Celery on Redis delivers at least once and has known ways to drop or repeat a message (celery
#5935, #2481, #4354; kombu #305). The ledger, not the broker, is the system of record: a message
only names job ids, a worker skips jobs that are not `queued`, and the dispatcher's reconciler sends
again what a lost message or a dead worker left behind. Each choice below, and why:

- `task_acks_late` + `task_reject_on_worker_lost`: a chunk is acknowledged only after it ran, so a
  worker killed mid-chunk leaves the message to be delivered again (the lease recovers it sooner).
- `worker_prefetch_multiplier = 1`, `worker_concurrency = 1` and the solo pool (`worker.main`): a
  GPU worker holds at most the chunk it renders; the rest stays in the queue for other workers.
- One `visibility_timeout` (`Settings.visibility_timeout_s`) in `broker_transport_options` and in
  `result_backend_transport_options` (every place Celery reads it), longer than the longest chunk.
  A chunk that outlives it is delivered a second time while it still runs; that copy finds its
  jobs `running` and does nothing. `unacked_restore_interval` and `unacked_restore_throttle` make
  the sweep that restores such messages run every few seconds rather than every ~100 s, so the
  redelivery really happens within about the timeout (this is what the fault suite exercises).
- `broker_connection_retry_on_startup`, `broker_connection_max_retries = None` and
  `broker_channel_error_retry`: a Redis restart never ends a worker; it reconnects and consumes on.
  `task_publish_retry_policy`: a send retries for about 9 s before it raises.
  `worker_cancel_long_running_tasks_on_connection_loss = False`: a chunk rendering while the broker
  blinks finishes and reports to the ledger; its message may come again and is then skipped.
- `task_ignore_result` and no result backend: results live in the ledger, never in Celery.
- SIGTERM is Celery's warm shutdown: no new message is taken and the running chunk finishes.
  `Settings.shutdown_grace_s` bounds that: `worker.main` hands the chunk's jobs back to the
  ledger (`queued`, no attempt charged) when it would run longer. `worker_soft_shutdown_timeout`
  gives a cold shutdown (SIGQUIT) the same grace.
- Retries are the ledger's business (attempts, leases), never Celery's: the task has
  `max_retries = 0`.
- JSON serialisation only; a message holds job ids, never specs, so it stays small.
- Task events on (`worker_send_task_events`, `task_send_sent_event`) and worker heartbeats, so
  Flower shows tasks and workers. On Redis they are pub/sub messages: nothing is stored when no
  one listens.
- With SDFARM_REDIS_SENTINELS the broker is kombu's sentinel transport (`broker_url`): after a
  failover the worker's reconnect (above) asks the sentinels and consumes from the new master.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from celery import Celery

from shared.config import Settings
from shared.redis_client import master_auth

__all__ = ["RENDER_CHUNK", "broker_url", "make_celery", "model_queue", "transport_options"]

RENDER_CHUNK = "sdfarm.render_chunk"  # args: (job_ids: list[str],) kwargs: {"model": str}


def model_queue(model: str) -> str:
    """Each model has its own queue, so a chunk only reaches a worker that holds its model."""
    return f"sdfarm.model.{model}"


def transport_options(settings: Settings) -> dict[str, Any]:
    """Redis transport options, shared by the broker and (unused) result backend settings."""
    visibility = settings.visibility_timeout_s
    return {
        "visibility_timeout": visibility,
        # Sweep for messages past their visibility timeout a few times per timeout, at most
        # every 10 s: one cheap ZRANGE per worker.
        "unacked_restore_interval": max(1, min(10, visibility // 3)),
        "unacked_restore_throttle": 1,
        # The broker's connections time out as the ledger's do (shared/redis_client.py); kombu
        # blocks 1 s per BRPOP, well inside the socket timeout.
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "health_check_interval": settings.redis_health_check_interval_s,
    } | _sentinel_options(settings)


def broker_url(settings: Settings) -> str:
    """SDFARM_REDIS_URL, or with SDFARM_REDIS_SENTINELS kombu's `sentinel://...;sentinel://...`
    (each with the master's password and database: kombu reads them from the first)."""
    if not settings.redis_sentinels:
        return settings.redis_url
    auth = master_auth(settings)
    user, password = (quote(auth[k] or "", safe="") for k in ("username", "password"))
    credentials = f"{user}:{password}@" if user or password else ""
    return ";".join(
        f"sentinel://{credentials}{f'[{host}]' if ':' in host else host}:{port}/{auth['db']}"
        for host, port in settings.redis_sentinels
    )


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    """kombu's sentinel transport: which master to ask for, and how to reach the sentinels."""
    if not settings.redis_sentinels:
        return {}
    return {
        "master_name": settings.redis_master,
        "sentinel_kwargs": {
            "password": settings.redis_sentinel_password,
            "socket_timeout": settings.redis_connect_timeout_s,
            "socket_connect_timeout": settings.redis_connect_timeout_s,
        },
    }


def make_celery(settings: Settings) -> Celery:
    app = Celery("sdfarm", broker=broker_url(settings), set_as_current=False)
    transport = transport_options(settings)
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
        # A send rides out a Redis restart or a Sentinel failover of a few seconds (about 9 s
        # in all) before it raises; the dispatcher's loop retries what is left after that.
        task_publish_retry_policy={
            "max_retries": 10,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        worker_soft_shutdown_timeout=settings.shutdown_grace_s,
        worker_enable_soft_shutdown_on_idle=False,
        worker_hijack_root_logger=False,
        # Task events (received/started/succeeded, and `sent` from the dispatcher) for Flower.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue="sdfarm.default",
        task_create_missing_queues=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
