"""Celery's task events and worker heartbeats, as Flower reads them: a real worker process and
the API's dispatcher send them to the test Redis, and Celery's own event receiver (the one Flower
is built on) sees the chunk go from sent to succeeded, and the worker come online and beat.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from producer.client import FarmClient
from shared.celery_app import RENDER_CHUNK, make_celery
from shared.config import Settings
from tests.fixtures_farm import FarmEnv


class Events:
    """Every Celery event on the broker, collected by a receiver in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = make_celery(settings)
        self.seen: list[dict[str, Any]] = []
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._capture, daemon=True)

    def _capture(self) -> None:
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(connection, handlers={"*": self.seen.append})
            self._receiver.capture(limit=None, timeout=None, wakeup=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=10)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in list(self.seen) if event.get("type") == kind]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                kinds = sorted({str(event.get("type")) for event in list(self.seen)})
                raise TimeoutError(f"events not seen in {timeout_s}s; seen: {kinds}")
            time.sleep(0.1)


@pytest.fixture
def events(farm_env: FarmEnv) -> Iterator[Events]:
    receiver = Events(farm_env.settings)
    receiver.start()
    yield receiver
    receiver.stop()


def test_a_rendered_chunk_and_its_worker_show_as_celery_events(
    farm_env: FarmEnv, serve_api: Callable[[Settings], str], events: Events
) -> None:
    # Given an event receiver on the broker, then a worker and the API (with its dispatcher)
    time.sleep(1.0)  # the receiver's subscription is in place before anything is sent
    worker = farm_env.start_worker()
    api_url = serve_api(farm_env.settings)
    farm_env.wait_for_workers(1)
    # When a job is submitted and rendered
    with FarmClient(api_url) as client:
        submitted = client.submit(prompts=["a heron"], defaults={"width": 64, "height": 64})
        status = client.wait(submitted["batch_id"], poll_s=0.2, timeout_s=180)
    assert status["counts"]["succeeded"] == 1, status
    # Then the chunk's task was sent, received, started and succeeded, as events
    events.wait_for(lambda: bool(events.of_type("task-succeeded")))
    sent = [e for e in events.of_type("task-sent") if e.get("name") == RENDER_CHUNK]
    assert sent, "the dispatcher sent no task-sent event"
    uuid = sent[0]["uuid"]
    for kind in ("task-received", "task-started", "task-succeeded"):
        assert any(e["uuid"] == uuid for e in events.of_type(kind)), f"no {kind} for {uuid}"
    assert submitted["job_ids"][0] in str(
        next(e for e in events.of_type("task-received") if e["uuid"] == uuid)["args"]
    )
    # And the worker came online and keeps beating, under its own hostname
    events.wait_for(lambda: len(events.of_type("worker-heartbeat")) >= 2, timeout_s=30)
    online = events.of_type("worker-online")
    assert online and all("@" in e["hostname"] for e in online), online
    assert worker.is_running()
