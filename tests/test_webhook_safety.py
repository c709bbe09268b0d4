"""Webhooks that no URL can break: a bad URL is refused at submit (and, stored, fails only its
own delivery), a refused address is never posted to, a trickling receiver holds only its own
webhook, URLs reach logs redacted, and a batch event's delivery id is fixed.

Receivers are real HTTP servers on 127.0.0.1, which the test API allows through
`SDFARM_WEBHOOK_ALLOW_NETWORKS=127.0.0.0/8` (tests.fixtures_api) unless a test says otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from producer import webhooks
from producer.finisher import Finisher
from producer.webhooks import DELIVERY_HEADER
from shared.storage import open_storage
from tests.fixtures_api import Api

_TRICKLED = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1: records each post's arrival and headers; a trickling
    one answers one byte every `trickle_s`."""

    url: str = ""
    trickle_s: float = 0.0
    posts: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def start_receiver() -> Iterator[Callable[..., Receiver]]:
    servers: list[tuple[ThreadingHTTPServer, Receiver]] = []

    def start(trickle_s: float = 0.0, path: str = "/hooks/sdfarm") -> Receiver:
        state = Receiver(trickle_s=trickle_s)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                state.posts.append((time.monotonic(), dict(self.headers)))
                if not state.trickle_s:
                    self.send_response(204)
                    self.end_headers()
                    return
                for byte in _TRICKLED:
                    if state.stop.wait(state.trickle_s):
                        return
                    try:
                        self.wfile.write(bytes([byte]))
                    except OSError:  # the farm hung up, as it should
                        return

            def log_message(self, *args: object) -> None:  # keep the test output quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        state.url = f"http://127.0.0.1:{server.server_address[1]}{path}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((server, state))
        return state

    yield start
    for server, state in servers:
        state.stop.set()
        server.shutdown()
        server.server_close()


def _ended_batch(api: Api, callback_url: str | None = None) -> str:
    """Submit a one-job batch (with `callback_url`) and cancel it, so that it ends now."""
    body: dict[str, object] = {"prompts": ["a kite"]}
    if callback_url is not None:
        body["callback_url"] = callback_url
    response = api.http.post("/v1/batches", json=body)
    assert response.status_code == 201, response.text
    batch_id = str(response.json()["batch_id"])
    api.http.delete(f"/v1/batches/{batch_id}")
    return batch_id


def _webhook(api: Api, batch_id: str) -> dict[str, object]:
    webhook = api.http.get(f"/v1/batches/{batch_id}").json()["webhook"]
    return webhook if webhook is not None else {"state": None}


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://a:b:c/", "scheme://host[:port]/path"),
        ("ftp://files.example/hook", "http:// or https://"),
        ("http://user:secret@hooks.example/", "user-info"),
        ("http:///no-host", "must name a host"),
        ("http://[not-ipv6]/", "scheme://host[:port]/path"),
        ("http://hooks.example/a b", "spaces"),
        ("http://hooks.example:0/", "port"),
    ],
)
def test_a_callback_url_that_is_no_http_url_with_a_host_is_refused_at_submit(
    api: Api, url: str, says: str
) -> None:
    as_json = api.http.post("/v1/batches", json={"prompts": ["a kite"], "callback_url": url})
    as_query = api.ndjson([{"prompt": "a kite"}], callback_url=url)
    for response in (as_json, as_query):
        assert response.status_code == 422, response.text
        assert says in response.json()["error"]


def test_a_refused_callback_url_is_answered_without_its_credentials_or_query(api: Api) -> None:
    url = "http://user:secret@hooks.example/?token=hush"
    response = api.http.post("/v1/batches", json={"prompts": ["a kite"], "callback_url": url})
    assert response.status_code == 422, response.text
    assert "secret" not in response.text and "hush" not in response.text
    assert "http://hooks.example/" in response.json()["problems"][0]["message"]


def test_a_bad_stored_callback_url_fails_its_own_delivery_and_others_still_arrive(
    start_api: Callable[..., Api], start_receiver: Callable[..., Receiver]
) -> None:
    # Given an API, and the URL that used to kill the sender refused at submit
    api = start_api()
    refused = api.http.post(
        "/v1/batches", json={"prompts": ["a kite"], "callback_url": "http://a:b:c/"}
    )
    assert refused.status_code == 422
    # And a delivery to that URL left in the queue from before URLs were parsed
    old = _ended_batch(api)
    api.ledger.webhooks.enqueue(old, "http://a:b:c/", "{}", "an-old-delivery")
    # When another batch with a good callback ends
    receiver = start_receiver()
    batch_id = _ended_batch(api, receiver.url)
    # Then its webhook arrives, and the bad one failed for good, saying why, at its first try
    api.wait_for(lambda: _webhook(api, batch_id)["state"] == "delivered", timeout_s=10)
    assert len(receiver.posts) == 1
    bad = _webhook(api, old)
    assert bad["state"] == "failed"
    assert bad["attempts"] == 1
    assert "not valid" in str(bad["error"])
    # And the sender goes on: a third batch's webhook arrives too
    again = _ended_batch(api, receiver.url)
    api.wait_for(lambda: _webhook(api, again)["state"] == "delivered", timeout_s=10)


def test_a_trickling_receiver_holds_only_its_own_webhook_and_only_until_the_deadline(
    start_api: Callable[..., Api], start_receiver: Callable[..., Receiver]
) -> None:
    # Given a receiver that answers one byte every 2 s, and a 4 s deadline per attempt
    slow, fast = start_receiver(trickle_s=2.0), start_receiver()
    api = start_api(webhook_timeout_s=4.0, webhook_max_attempts=1)
    slow_batch = _ended_batch(api, slow.url)
    api.wait_for(lambda: len(slow.posts) == 1, timeout_s=10)
    # When another batch ends while the slow receiver holds its delivery
    ended_at = time.monotonic()
    fast_batch = _ended_batch(api, fast.url)
    api.wait_for(lambda: len(fast.posts) == 1, timeout_s=10)
    # Then the other webhook arrives on time, while the slow one is still in flight
    assert fast.posts[0][0] - ended_at < 3.0
    assert _webhook(api, slow_batch)["state"] == "pending"
    assert _webhook(api, fast_batch)["state"] in ("pending", "delivered")
    # And the slow one is cut at the deadline, not after its 74 s of trickle
    api.wait_for(lambda: _webhook(api, slow_batch)["state"] == "failed", timeout_s=10)
    failed_after_s = time.monotonic() - slow.posts[0][0]
    assert failed_after_s < 4.0 + 2.0
    assert "deadline" in str(_webhook(api, slow_batch)["error"])


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://localhost:9/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://100.100.100.200/", "cloud metadata"),
        ("http://10.1.2.3/hook", "private"),
        ("http://[::ffff:192.168.0.1]/hook", "private"),
        ("http://224.0.0.1/hook", "multicast"),
    ],
)
def test_a_callback_to_an_address_that_is_not_public_is_refused_at_submit(
    start_api: Callable[..., Api], url: str, kind: str
) -> None:
    api = start_api(webhook_allow_networks=[])
    response = api.http.post("/v1/batches", json={"prompts": ["a kite"], "callback_url": url})
    assert response.status_code == 422
    assert f"a {kind} address" in response.json()["error"]
    assert "SDFARM_WEBHOOK_ALLOW_NETWORKS" in response.json()["error"]


def test_a_name_that_resolves_to_a_refused_address_is_never_posted_to(
    start_api: Callable[..., Api], start_receiver: Callable[..., Receiver]
) -> None:
    # Given a farm that allows no private network, and a receiver on this machine
    api = start_api(webhook_allow_networks=[])
    receiver = start_receiver()
    port = receiver.url.split(":")[2].split("/")[0]
    # And a stored delivery to a name that resolves to loopback (as a name that resolved to a
    # public address at submit and to 127.0.0.1 at delivery, DNS rebinding, would)
    batch_id = _ended_batch(api)
    api.ledger.webhooks.enqueue(batch_id, f"http://localhost:{port}/hook", "{}", "rebound")
    # When the sender takes it, then the resolved address is checked: refused for good, unsent
    api.wait_for(lambda: _webhook(api, batch_id)["state"] == "failed", timeout_s=10)
    webhook = _webhook(api, batch_id)
    assert "loopback address" in str(webhook["error"])
    assert webhook["attempts"] == 1
    assert receiver.posts == []


def test_callback_credentials_and_queries_never_reach_the_logs(
    start_api: Callable[..., Api],
    start_receiver: Callable[..., Receiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="producer.webhooks")
    api = start_api()
    receiver = start_receiver(path="/hooks/sdfarm")
    # Given a delivered webhook whose URL carries a token in its query
    delivered = _ended_batch(api, receiver.url + "?token=query-secret-1")
    # And a stored one with user-info (refused at submit now, but left from before)
    old = _ended_batch(api)
    url = receiver.url.replace("http://", "http://user:userinfo-secret-2@") + "?k=query-secret-3"
    api.ledger.webhooks.enqueue(old, url, "{}", "an-old-delivery")
    api.wait_for(lambda: _webhook(api, delivered)["state"] == "delivered", timeout_s=10)
    api.wait_for(lambda: _webhook(api, old)["state"] == "failed", timeout_s=10)
    # Then the logs name where each went, and none of the secrets (nor does the batch record)
    assert "/hooks/sdfarm" in caplog.text
    shown = caplog.text + str(_webhook(api, old)) + str(_webhook(api, delivered))
    for secret in ("query-secret-1", "userinfo-secret-2", "query-secret-3"):
        assert secret not in shown


def test_every_process_that_finishes_a_batch_sends_the_same_delivery_id(
    start_api: Callable[..., Api], start_receiver: Callable[..., Receiver]
) -> None:
    # Given a batch whose webhook was delivered
    api = start_api()
    receiver = start_receiver()
    batch_id = _ended_batch(api, receiver.url)
    api.wait_for(lambda: len(receiver.posts) == 1, timeout_s=10)
    # When a second API process's finisher handles the same ended batch
    settings = api.settings
    storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url)
    Finisher(api.ledger, storage, settings).finish(batch_id)
    api.wait_for(lambda: len(receiver.posts) == 2, timeout_s=10)
    # Then the receiver sees the same delivery id twice, so it can drop the repeat
    first, second = (headers[DELIVERY_HEADER] for _, headers in receiver.posts)
    assert first == second == webhooks.delivery_id(batch_id, "batch.finished")
