"""Webhooks: when a batch with a `callback_url` ends, the farm POSTs its summary there.

The body is JSON; `X-Sdfarm-Signature: sha256=<hex>` is the HMAC-SHA256 of the raw body under the
farm's `webhook_secret`, so a receiver can check that the farm sent it (`verify`).
`X-Sdfarm-Delivery` is the same on every retry of one delivery, so a receiver can drop repeats.

Deliveries wait in the ledger's webhook queue (`shared.ledger.deliveries`) until they are due;
a sender thread in each API process claims due ones there, each for longer than the request
timeout, so a sender that dies mid-delivery leaves them to be tried again (at least once). A
failed attempt is retried with exponential backoff until `webhook_max_attempts`. Nothing here
runs on a worker, so a slow or dead receiver never holds up rendering.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Any

import httpx
import redis

from shared.config import Settings
from shared.ledger import Ledger
from shared.ledger.deliveries import Delivery

__all__ = ["DELIVERY_HEADER", "SIGNATURE_HEADER", "WebhookSender", "enqueue", "sign", "verify"]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Sdfarm-Signature"
DELIVERY_HEADER = "X-Sdfarm-Delivery"
_CLAIM_BATCH = 10  # deliveries claimed per look at the queue
_CLAIM_SLACK_S = 30  # a claim outlasts the request timeout by this, so one attempt is never two


def sign(secret: str, body: bytes) -> str:
    """The value of `X-Sdfarm-Signature` for this body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """What a receiver runs: does the header match the raw body? (constant time)"""
    return hmac.compare_digest(sign(secret, body), signature)


def enqueue(ledger: Ledger, batch_id: str, url: str, summary: dict[str, Any]) -> str:
    """Schedule a delivery of `summary` to `url` now; returns the delivery id."""
    body = json.dumps(summary, separators=(",", ":"))
    return ledger.webhooks.enqueue(batch_id, url, body).delivery_id


class WebhookSender:
    """Delivers due webhooks, one at a time, retrying failures with backoff."""

    def __init__(
        self,
        ledger: Ledger,
        settings: Settings,
        *,
        poll_s: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.poll_s = poll_s
        self._transport = transport

    def run(self, stop: threading.Event) -> None:
        with httpx.Client(
            timeout=self.settings.webhook_timeout_s, transport=self._transport
        ) as http:
            while not stop.is_set():
                try:
                    if self.deliver_due(http) == 0:
                        stop.wait(self.poll_s)
                except redis.RedisError as e:
                    log.warning("webhook sender: redis unavailable (%s); retrying", e)
                    stop.wait(1.0)

    def deliver_due(self, http: httpx.Client) -> int:
        """Try every delivery that is due now; returns how many were tried."""
        now = time.time()
        tried = 0
        hold_until = now + self.settings.webhook_timeout_s + _CLAIM_SLACK_S
        for delivery in self.ledger.webhooks.due(now, _CLAIM_BATCH):
            if self.ledger.webhooks.claim(delivery, now, hold_until):
                self._attempt(http, delivery)
                tried += 1
        return tried

    def _attempt(self, http: httpx.Client, delivery: Delivery) -> None:
        body = delivery.body.encode()
        batch_id, attempt = delivery.batch_id, delivery.attempts + 1
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "sdfarm-webhook/1",
            SIGNATURE_HEADER: sign(self.settings.webhook_secret or "", body),
            DELIVERY_HEADER: delivery.delivery_id,
        }
        error = ""
        try:
            response = http.post(delivery.url, content=body, headers=headers)
            if not 200 <= response.status_code < 300:
                error = f"the receiver answered HTTP {response.status_code}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        if not error:
            self.ledger.webhooks.record_attempt(delivery)
            log.info("batch %s: webhook delivered to %s", batch_id, delivery.url)
        elif attempt >= self.settings.webhook_max_attempts:
            self.ledger.webhooks.record_attempt(delivery, error=error)
            log.warning("batch %s: webhook gave up after %d attempts: %s", batch_id, attempt, error)
        else:
            delay = min(
                self.settings.webhook_backoff_max_s,
                self.settings.webhook_backoff_s * 2 ** (attempt - 1),
            )
            self.ledger.webhooks.record_attempt(delivery, error=error, retry_at=time.time() + delay)
            log.warning(
                "batch %s: webhook attempt %d failed (%s); next in %.1fs",
                batch_id,
                attempt,
                error,
                delay,
            )
