"""What `FarmClient` and `AsyncFarmClient` share: each call as a request, how an error answer
becomes the farm's error tree, NDJSON bodies, and when a wait is over. Nothing here talks to the
network: each client sends the `Call` and hands the response back here. The answers' types are
in `client_types`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from producer.client_types import BatchStatus, SubmitOptions
from shared.errors import (
    AccessDenied,
    FarmUnreachable,
    InvalidJob,
    LedgerFull,
    RateLimited,
    SdfarmError,
    UnknownId,
)

__all__ = [
    "FINAL",
    "Call",
    "NdjsonPieces",
    "Routes",
    "Waiting",
    "checked_image",
    "download_failed",
    "http_options",
    "ndjson",
    "raise_for",
    "unreachable",
    "upload_call",
]

FINAL = ("succeeded", "failed", "cancelled")
_NDJSON_PIECE = 500  # jobs per piece of a streamed NDJSON body


# -- the calls ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request, as both clients send it (`content` is left to the client: it streams)."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def send_args(self) -> dict[str, Any]:
        """The keyword arguments of `httpx.Client.request` (and of the async one) for it."""
        args: dict[str, Any] = {"params": self.params, "headers": self.headers}
        if self.json is not None:
            args["json"] = self.json
        return args


class Routes:
    """The farm's routes, one request builder a call (`Routes.batch(batch_id)`)."""

    @staticmethod
    def submit(jobs: Sequence[dict[str, Any]] | None, options: SubmitOptions) -> Call:
        body: dict[str, Any] = {"defaults": options.get("defaults") or {}}
        for name, value in (
            ("jobs", jobs),
            ("prompts", options.get("prompts")),
            ("a1111", options.get("a1111")),
        ):
            if value is not None:
                body[name] = list(value)
        for name in ("priority", "callback_url"):
            if options.get(name) is not None:
                body[name] = options.get(name)
        return Call("POST", "/v1/batches", json=body, headers=_idempotency(options))

    @staticmethod
    def submit_stream(options: SubmitOptions) -> Call:
        params = {
            name: options.get(name)
            for name in ("priority", "callback_url")
            if options.get(name) is not None
        }
        headers = {"Content-Type": "application/x-ndjson", **_idempotency(options)}
        return Call("POST", "/v1/batches", params=params, headers=headers)

    @staticmethod
    def health() -> Call:
        return Call("GET", "/healthz")

    @staticmethod
    def batch(batch_id: str) -> Call:
        return Call("GET", f"/v1/batches/{batch_id}")

    @staticmethod
    def batches(limit: int) -> Call:
        return Call("GET", "/v1/batches", params={"limit": limit})

    @staticmethod
    def job(job_id: str) -> Call:
        return Call("GET", f"/v1/jobs/{job_id}")

    @staticmethod
    def jobs_page(batch_id: str, cursor: int, state: str | None, page: int) -> Call:
        params: dict[str, Any] = {"cursor": cursor, "limit": page}
        if state:
            params["state"] = state
        return Call("GET", f"/v1/batches/{batch_id}/jobs", params=params)

    @staticmethod
    def manifest(batch_id: str) -> Call:
        return Call("GET", f"/v1/batches/{batch_id}/manifest")

    @staticmethod
    def image(job_id: str) -> Call:
        return Call("GET", f"/v1/jobs/{job_id}/image")

    @staticmethod
    def workers() -> Call:
        return Call("GET", "/v1/workers")

    @staticmethod
    def cancel(job_id: str) -> Call:
        return Call("DELETE", f"/v1/jobs/{job_id}")

    @staticmethod
    def cancel_batch(batch_id: str) -> Call:
        return Call("DELETE", f"/v1/batches/{batch_id}")

    @staticmethod
    def retry(batch_id: str) -> Call:
        return Call("POST", f"/v1/batches/{batch_id}/retry")


def upload_call(image: Path | bytes) -> tuple[Call, bytes]:
    """The request that stores an init image (a PNG or JPEG file, or its bytes), and its body."""
    data = image.read_bytes() if isinstance(image, Path) else image
    kind = "image/jpeg" if data.startswith(b"\xff\xd8\xff") else "image/png"
    return Call("POST", "/v1/uploads", headers={"Content-Type": kind}), data


def http_options(api_url: str, api_key: str | None, timeout_s: float) -> dict[str, Any]:
    """The keyword arguments of both clients' httpx client: base URL, key, timeout."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {"base_url": api_url.rstrip("/"), "headers": headers, "timeout": timeout_s}


def _idempotency(options: SubmitOptions) -> dict[str, str]:
    key = options.get("idempotency_key")
    return {"Idempotency-Key": key} if key else {}


class NdjsonPieces:
    """Jobs as NDJSON in pieces of a few hundred lines: `add` returns a piece when one is full,
    `rest` the last one (or None), so a body streams as its jobs are produced."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def add(self, job: dict[str, Any]) -> bytes | None:
        self._lines.append(json.dumps(job, separators=(",", ":")))
        return self.rest() if len(self._lines) == _NDJSON_PIECE else None

    def rest(self) -> bytes | None:
        if not self._lines:
            return None
        piece, self._lines = ("\n".join(self._lines) + "\n").encode(), []
        return piece


def ndjson(jobs: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """The NDJSON body of `jobs`, produced as `jobs` is read."""
    pieces = NdjsonPieces()
    for job in jobs:
        if piece := pieces.add(job):
            yield piece
    if last := pieces.rest():
        yield last


# -- the answers to errors, and the end of a wait -------------------------------------------------


def unreachable(base_url: object, error: httpx.TransportError) -> FarmUnreachable:
    return FarmUnreachable(f"cannot reach the farm at {base_url}: {error}")


def raise_for(response: httpx.Response) -> None:
    """Raise the farm's error for an error answer (the body must have been read); else nothing."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:300]}
    message = body.get("error", response.reason_phrase) if isinstance(body, dict) else str(body)
    status = response.status_code
    if status == 401:
        raise AccessDenied(f"the farm refused the API key ({message}); set SDFARM_API_KEY")
    if status == 404:
        raise UnknownId(message)
    if status in (400, 413, 415, 422):
        raise InvalidJob(message, body.get("problems") if isinstance(body, dict) else None)
    if status == 429:
        retry_after = response.headers.get("retry-after", "")
        raise RateLimited(message, int(retry_after) if retry_after.isdigit() else 60)
    if status == 507:
        raise LedgerFull(message)
    if status >= 500:
        raise FarmUnreachable(f"the farm answered {status}: {message}")
    raise SdfarmError(f"the farm answered {status}: {message}")


def download_failed(job_id: str, error: httpx.TransportError) -> FarmUnreachable:
    return FarmUnreachable(f"cannot download the image of {job_id}: {error}")


def checked_image(job_id: str, fetched: httpx.Response) -> bytes:
    """The bytes of an image downloaded from its presigned URL, or FarmUnreachable."""
    if fetched.status_code != 200:
        raise FarmUnreachable(
            f"the image of {job_id} could not be downloaded (HTTP {fetched.status_code})"
        )
    return fetched.content


class Waiting:
    """When a wait for a batch is over: every job final, or TimeoutError past `timeout_s`."""

    def __init__(self, batch_id: str, timeout_s: float | None) -> None:
        self.batch_id = batch_id
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def over(self, status: BatchStatus) -> bool:
        if sum(status["counts"][s] for s in FINAL) == status["total"]:
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError(
                f"batch {self.batch_id} not finished after {self.timeout_s}s: {status['counts']}"
            )
        return False
