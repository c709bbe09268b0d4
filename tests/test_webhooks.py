"""Webhooks: a batch's end is POSTed to its callback URL, signed, and retried with backoff."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from producer.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, verify
from tests.fixtures_api import WEBHOOK_SECRET, Api


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records what it gets and fails the first N posts."""

    url: str
    fail_first: int = 0
    posts: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.posts.append((time.monotonic(), dict(self.headers), body))
            self.send_response(500 if len(state.posts) <= state.fail_first else 204)
            self.end_headers()

        def log_message(self, *args: object) -> None:  # keep the test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/sdfarm"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def test_a_batch_end_is_posted_signed_and_retried_with_backoff(
    start_api,
    receiver: Receiver,
) -> None:
    # Given a receiver that fails twice, and an API retrying after 0.2 s, then 0.4 s
    receiver.fail_first = 2
    api: Api = start_api(webhook_backoff_s=0.2)
    # And a batch with a callback URL (sent as NDJSON, batch options in the query)
    submitted = api.ndjson(
        [{"prompt": "a kite"}, {"prompt": "a comet"}], callback_url=receiver.url, priority=3
    ).json()
    # When the batch ends (one job renders, the other is cancelled)
    api.render_as_worker(submitted["job_ids"][0])
    api.http.delete(f"/v1/jobs/{submitted['job_ids'][1]}")
    api.wait_for(lambda: len(receiver.posts) >= 3, timeout_s=15)
    # Then the third attempt is delivered, after a growing wait, as one delivery id
    (t1, h1, body), (t2, h2, _), (t3, h3, again) = receiver.posts[:3]
    assert t2 - t1 >= 0.2
    assert t3 - t2 >= 0.4
    assert h1[DELIVERY_HEADER] == h2[DELIVERY_HEADER] == h3[DELIVERY_HEADER]
    assert body == again
    # And each post is signed with HMAC-SHA256 over the raw body
    assert h3[SIGNATURE_HEADER].startswith("sha256=")
    assert verify(WEBHOOK_SECRET, body, h3[SIGNATURE_HEADER])
    assert not verify("another secret", body, h3[SIGNATURE_HEADER])
    # And the body is the batch's summary, with where its manifest is
    summary = json.loads(body)
    assert summary["event"] == "batch.finished"
    assert summary["batch_id"] == submitted["batch_id"]
    assert summary["counts"]["succeeded"] == 1
    assert summary["counts"]["cancelled"] == 1
    assert summary["priority"] == 3
    assert summary["manifest"]["key"].endswith(f"/{submitted['batch_id']}/manifest.ndjson")
    # And the batch shows the delivery
    api.wait_for(
        lambda: (
            api.http.get(f"/v1/batches/{submitted['batch_id']}").json()["webhook"]["state"]
            == "delivered"
        )
    )
    webhook = api.http.get(f"/v1/batches/{submitted['batch_id']}").json()["webhook"]
    assert webhook["attempts"] == 3


def test_a_receiver_that_keeps_failing_is_given_up_on_after_the_set_attempts(
    start_api,
    receiver: Receiver,
) -> None:
    receiver.fail_first = 100
    api: Api = start_api(webhook_backoff_s=0.05, webhook_max_attempts=3)
    submitted = api.http.post(
        "/v1/batches", json={"prompts": ["a kite"], "callback_url": receiver.url}
    ).json()
    api.http.delete(f"/v1/batches/{submitted['batch_id']}")

    def gave_up() -> bool:
        webhook = api.http.get(f"/v1/batches/{submitted['batch_id']}").json()["webhook"]
        return webhook is not None and webhook["state"] == "failed"

    api.wait_for(gave_up, timeout_s=10)
    webhook = api.http.get(f"/v1/batches/{submitted['batch_id']}").json()["webhook"]
    assert webhook["attempts"] == 3
    assert webhook["error"] == "the receiver answered HTTP 500"
    assert len(receiver.posts) == 3


def test_a_callback_is_refused_when_the_farm_has_no_secret_to_sign_with(
    start_api,
    receiver: Receiver,
) -> None:
    api: Api = start_api(webhook_secret=None)
    response = api.http.post(
        "/v1/batches", json={"prompts": ["a kite"], "callback_url": receiver.url}
    )
    assert response.status_code == 422
    assert "SDFARM_WEBHOOK_SECRET" in response.json()["error"]
