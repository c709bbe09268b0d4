"""Webhooks: when a batch with a `callback_url` ends, the farm POSTs its summary there.

The body is JSON; `X-Sdfarm-Signature: sha256=<hex>` is the HMAC-SHA256 of the raw body under
the farm's `webhook_secret`, so a receiver can check that the farm sent it (`verify`).
`X-Sdfarm-Delivery` is fixed per batch event (`delivery_id`): the same on every retry, and from
every API process that finishes the batch, so a receiver can drop repeats.

Deliveries wait in the ledger's webhook queue (`shared.ledger.deliveries`) until they are due;
a sender thread in each API process claims due ones there, each for longer than an attempt may
take, so a sender that dies mid-delivery leaves them to be tried again (at least once). Up to
`webhook_concurrency` attempts run at once, each inside its own whole-attempt deadline
(`webhook_timeout_s`), so a slow receiver holds only its own delivery. How one attempt reaches
its receiver, and which receivers it may not reach, is `producer.webhook_post`. A failed attempt
is retried with exponential backoff until `webhook_max_attempts`; one that cannot succeed (a URL
that does not parse, a refused address) fails at once. Nothing here runs on a worker, so a slow
or dead receiver never holds up rendering. Log lines show a callback URL only `redact`ed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import redis

from producer.loop_health import Backoff
from producer.webhook_post import Outcome, post
from shared.callback_urls import redact
from shared.config import Settings
from shared.ledger import Ledger
from shared.ledger.deliveries import Delivery

__all__ = [
    "DELIVERY_HEADER",
    "SIGNATURE_HEADER",
    "WebhookSender",
    "delivery_id",
    "enqueue",
    "sign",
    "verify",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Sdfarm-Signature"
DELIVERY_HEADER = "X-Sdfarm-Delivery"
_CLAIM_SLACK_S = 30  # a claim outlasts the attempt's deadline by this, so one attempt is never two
_REDIS_RETRY_S = 1.0  # first pause after the sender failed (Redis down), doubling in a row


def sign(secret: str, body: bytes) -> str:
    """The value of `X-Sdfarm-Signature` for this body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """What a receiver runs: does the header match the raw body? (constant time)"""
    return hmac.compare_digest(sign(secret, body), signature)


def delivery_id(batch_id: str, event: str) -> str:
    """The delivery id of one batch event: the same wherever and however often it is computed."""
    return hashlib.sha256(f"sdfarm-webhook\n{batch_id}\n{event}".encode()).hexdigest()[:32]


def enqueue(
    ledger: Ledger, batch_id: str, url: str, summary: dict[str, Any], *, once_for: str = ""
) -> str | None:
    """Schedule a delivery of `summary` (its `event` names it) to `url` now; returns its id.

    With `once_for` (the batch's end), None when that end's delivery was scheduled already.
    """
    body = json.dumps(summary, separators=(",", ":"))
    fixed_id = delivery_id(batch_id, str(summary["event"]))
    delivery = ledger.webhooks.enqueue(batch_id, url, body, fixed_id, once_for=once_for)
    return None if delivery is None else delivery.delivery_id


class WebhookSender:
    """Delivers due webhooks, several at once, retrying failures with backoff."""

    def __init__(self, ledger: Ledger, settings: Settings, *, poll_s: float = 0.2) -> None:
        self.ledger = ledger
        self.settings = settings
        self.poll_s = poll_s

    def run(self, stop: threading.Event) -> None:
        asyncio.run(self._serve(stop))

    async def _serve(self, stop: threading.Event) -> None:
        # Ledger calls and name lookups run in threads, so neither blocks another delivery; the
        # pool is big enough that lookups that hang cannot starve the ledger calls.
        workers = 2 * self.settings.webhook_concurrency + 2
        executor = ThreadPoolExecutor(workers, thread_name_prefix="webhooks")
        asyncio.get_running_loop().set_default_executor(executor)
        in_flight: set[asyncio.Task[None]] = set()
        backoff = Backoff(_REDIS_RETRY_S)
        # No proxies from the environment (the farm must connect to the address it checked) and
        # no kept connections (one made for a name must not carry a request for another).
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(trust_env=False, limits=limits) as http:
            try:
                while not stop.is_set():
                    try:
                        started = await self._start_due(http, in_flight)
                    except Exception as e:  # the loop goes on whatever failed (habit 15)
                        wait_s = backoff.next_s()
                        if isinstance(e, redis.RedisError):
                            log.warning("webhook sender: redis unavailable (%s); retrying", e)
                        else:
                            log.exception("webhook sender: failed unexpectedly; retrying")
                        await asyncio.sleep(wait_s)
                        continue
                    backoff.reset()
                    if not started and in_flight:
                        done = asyncio.FIRST_COMPLETED
                        await asyncio.wait(in_flight, timeout=self.poll_s, return_when=done)
                    elif not started:
                        await asyncio.sleep(self.poll_s)
            finally:  # attempts cut short here are tried again once their claims expire
                for task in in_flight:
                    task.cancel()
                await asyncio.gather(*in_flight, return_exceptions=True)
        executor.shutdown(wait=False, cancel_futures=True)

    async def _start_due(self, http: httpx.AsyncClient, in_flight: set[asyncio.Task[None]]) -> int:
        """Claim due deliveries while there is room in flight; returns how many were started."""
        room = self.settings.webhook_concurrency - len(in_flight)
        if room <= 0:
            return 0
        now = time.time()
        hold_until = now + self.settings.webhook_timeout_s + _CLAIM_SLACK_S
        started = 0
        for delivery in await asyncio.to_thread(self.ledger.webhooks.due, now, room):
            if await asyncio.to_thread(self.ledger.webhooks.claim, delivery, now, hold_until):
                task = asyncio.create_task(self._deliver(http, delivery))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                started += 1
        return started

    async def _deliver(self, http: httpx.AsyncClient, delivery: Delivery) -> None:
        """One attempt at a claimed delivery, then its outcome in the ledger."""
        body = delivery.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "sdfarm-webhook/1",
            SIGNATURE_HEADER: sign(self.settings.webhook_secret or "", body),
            DELIVERY_HEADER: delivery.delivery_id,
        }
        try:
            outcome = await post(
                http,
                delivery.url,
                body,
                headers,
                allow=self.settings.webhook_allow_networks,
                deadline_s=self.settings.webhook_timeout_s,
            )
        except Exception as e:  # a bug met by one delivery must not stop the others (habit 15)
            log.exception("batch %s: webhook attempt failed unexpectedly", delivery.batch_id)
            outcome = Outcome(f"the farm failed to send it ({type(e).__name__})")
        try:
            await asyncio.to_thread(self._settle, delivery, outcome)
        except Exception as e:  # Redis down, or a bug: the claim lapses and it is tried again
            log.warning(
                "batch %s: webhook outcome not recorded (%s); it is tried again after its claim",
                delivery.batch_id,
                e,
            )

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """Record the attempt: delivered, retried after a backoff, or given up."""
        batch_id, attempt, error = delivery.batch_id, delivery.attempts + 1, outcome.error
        where = redact(delivery.url)
        if not error:
            self.ledger.webhooks.record_attempt(delivery)
            log.info("batch %s: webhook delivered to %s", batch_id, where)
        elif outcome.permanent or attempt >= self.settings.webhook_max_attempts:
            self.ledger.webhooks.record_attempt(delivery, error=error)
            log.warning(
                "batch %s: webhook to %s given up after %d attempts: %s",
                batch_id,
                where,
                attempt,
                error,
            )
        else:
            delay = min(
                self.settings.webhook_backoff_max_s,
                self.settings.webhook_backoff_s * 2 ** (attempt - 1),
            )
            self.ledger.webhooks.record_attempt(delivery, error=error, retry_at=time.time() + delay)
            log.warning(
                "batch %s: webhook attempt %d to %s failed (%s); next in %.1fs",
                batch_id,
                attempt,
                where,
                error,
                delay,
            )
