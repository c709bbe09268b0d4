"""Background loops never die quietly (issue 12, item 6): a loop that raises goes on, a Redis
error mid-finish is retried without a second webhook, and /healthz reports each loop's
liveness, with a 503 when one stalls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from producer import finisher as finisher_module
from producer.dispatcher import Dispatcher
from producer.finisher import Finisher
from producer.loop_health import LoopPulse, supervise
from shared.ledger.loops import Loops
from tests.fixtures_api import Api
from tests.hook_receiver import Receiver, receiving


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as state:
        yield state


def _ended_batch(api: Api, callback_url: str | None = None) -> str:
    """A one-job batch (with `callback_url`), cancelled so that it ends now."""
    body: dict[str, object] = {"prompts": ["a kite"]}
    if callback_url is not None:
        body["callback_url"] = callback_url
    response = api.http.post("/v1/batches", json=body)
    assert response.status_code == 201, response.text
    batch_id = str(response.json()["batch_id"])
    api.http.delete(f"/v1/batches/{batch_id}")
    return batch_id


def _health(api: Api) -> tuple[int, dict[str, Any]]:
    response = api.http.get("/healthz")
    return response.status_code, response.json()


def _fail_once(error: Exception, real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, except that its first call raises `error`."""
    calls: list[int] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    return call


def test_a_loop_that_raises_is_started_again_and_one_that_keeps_failing_stalls() -> None:
    # Given a loop that fails at once the first time it runs, then iterates until stopped
    runs: list[int] = []

    def flaky(stop: threading.Event) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("a bug met once")
        while not stop.is_set():
            stop.wait(0.01)

    pulse = LoopPulse("flaky", stall_s=0.3)
    pulse.thread = threading.Thread(target=supervise, args=(flaky, pulse), daemon=True)
    pulse.thread.start()
    # Then it is started again after a short backoff, and reports alive, with its one failure
    time.sleep(1.2)
    state = pulse.state()
    assert len(runs) == 2
    assert state.alive and state.restarts == 1
    assert state.last_error == "RuntimeError: a bug met once"
    pulse.set()
    pulse.thread.join(5)
    assert not pulse.thread.is_alive()

    # Given a loop that fails on every iteration
    def broken(stop: threading.Event) -> None:
        stop.is_set()
        raise RuntimeError("always")

    pulse = LoopPulse("broken", stall_s=0.3)
    pulse.thread = threading.Thread(target=supervise, args=(broken, pulse), daemon=True)
    pulse.thread.start()
    # Then it never completes an iteration, and is reported stalled though its thread lives
    time.sleep(0.8)
    assert pulse.thread.is_alive()
    assert not pulse.state().alive
    pulse.set()
    pulse.thread.join(20)


def test_a_dispatcher_that_raises_keeps_dispatching_and_healthz_shows_it(
    start_api: Callable[..., Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a dispatcher whose first round meets a bug
    monkeypatch.setattr(Dispatcher, "tick", _fail_once(RuntimeError("bug"), Dispatcher.tick))
    api = start_api()
    # Then it is started again: /healthz shows it alive, active, with one restart
    api.wait_for(lambda: _health(api)[1]["loops"]["dispatcher"]["restarts"] == 1)
    api.wait_for(lambda: _health(api)[1]["dispatcher_active"])
    status, health = _health(api)
    assert status == 200 and health["ok"]
    assert set(health["loops"]) == {"dispatcher", "finisher", "webhooks"}
    assert health["loops"]["dispatcher"]["alive"]
    assert health["loops"]["dispatcher"]["last_error"] == "RuntimeError: bug"


def test_a_finisher_that_raises_once_still_finishes_the_batch(
    start_api: Callable[..., Api],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a finisher whose first manifest meets a bug
    real = finisher_module.write_manifest
    monkeypatch.setattr(finisher_module, "write_manifest", _fail_once(RuntimeError("bug"), real))
    api = start_api()
    # When a batch ends
    batch_id = _ended_batch(api)
    # Then its manifest is stored after all, and the failure was logged with the batch id
    api.wait_for(lambda: api.ledger.batch(batch_id).manifest is not None, timeout_s=15)
    assert f"batch {batch_id}: finish failed unexpectedly" in caplog.text
    # And the finisher is alive, never restarted: the failure ended one iteration only
    status, health = _health(api)
    assert status == 200
    assert health["loops"]["finisher"]["alive"] and health["loops"]["finisher"]["restarts"] == 0


def test_a_redis_error_mid_finish_is_retried_and_sends_one_webhook(
    start_api: Callable[..., Api], monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    # Given Redis failing once mid-finish, after the manifest was stored
    error = redis.ConnectionError("Redis went away mid-finish")
    monkeypatch.setattr(Loops, "mark_finished", _fail_once(error, Loops.mark_finished))
    api = start_api()
    # When a batch with a callback URL ends
    batch_id = _ended_batch(api, receiver.url)
    # Then the finish is tried again: the manifest is recorded, the webhook delivered once
    api.wait_for(lambda: len(receiver.posts) == 1, timeout_s=20)
    assert api.ledger.batch(batch_id).manifest is not None
    time.sleep(2)
    assert len(receiver.posts) == 1
    # And nothing of the finish is left claimed or waiting
    assert api.ledger.loops.finish_owner(batch_id) is None
    assert api.ledger.redis.llen(api.ledger.keys.finished()) == 0


def test_healthz_answers_503_while_a_loop_is_stalled(
    start_api: Callable[..., Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a finisher that hangs on the next batch until released
    release = threading.Event()
    real = Finisher.handle

    def hang(self: Finisher, batch_id: str) -> bool:
        release.wait(30)
        return real(self, batch_id)

    monkeypatch.setattr(Finisher, "handle", hang)
    api = start_api(loop_stall_s=2.0)
    assert _health(api)[0] == 200
    # When a batch ends and the finisher hangs on it past loop_stall_s
    batch_id = _ended_batch(api)
    api.wait_for(lambda: _health(api)[0] == 503, timeout_s=10)
    # Then /healthz is 503 naming the stalled loop, fast, while the others are alive
    started = time.monotonic()
    status, health = _health(api)
    assert time.monotonic() - started < 0.5
    assert status == 503 and not health["ok"]
    assert not health["loops"]["finisher"]["alive"]
    assert health["loops"]["finisher"]["last_iteration_s_ago"] > 2.0
    assert health["loops"]["dispatcher"]["alive"] and health["loops"]["webhooks"]["alive"]
    # And once the loop goes on, the batch is finished and /healthz is 200 again
    release.set()
    api.wait_for(lambda: api.ledger.batch(batch_id).manifest is not None)
    api.wait_for(lambda: _health(api)[0] == 200)
