"""A small client for the farm's HTTP API (httpx). Installs and runs without torch.

Errors come back as the farm's own error tree: a refused field is `InvalidJob`, an unknown id
`UnknownId`, a missing or wrong key `AccessDenied`, an unreachable or failing farm
`FarmUnreachable`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import httpx

from shared.errors import (
    AccessDenied,
    FarmUnreachable,
    InvalidJob,
    LedgerFull,
    RateLimited,
    SdfarmError,
    UnknownId,
)

__all__ = ["FINAL", "FarmClient"]

log = logging.getLogger(__name__)
FINAL = ("succeeded", "failed", "cancelled")
_NDJSON_PIECE = 500  # jobs per piece of a streamed NDJSON body


class FarmClient:
    """Talks to `sdfarm api`."""

    def __init__(
        self,
        api_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=api_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FarmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise FarmUnreachable(f"cannot reach the farm at {self.http.base_url}: {e}") from e
        _raise_for(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # -- submitting -----------------------------------------------------------------------------

    def submit(
        self,
        jobs: Sequence[dict[str, Any]] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        a1111: Sequence[str] | None = None,
        defaults: dict[str, Any] | None = None,
        priority: int | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Submit a batch as one JSON body (`jobs`, `prompts` or A1111 infotexts `a1111`);
        returns `{"batch_id", "job_ids", "replayed"}`."""
        body: dict[str, Any] = {"defaults": defaults or {}}
        if jobs is not None:
            body["jobs"] = list(jobs)
        if prompts is not None:
            body["prompts"] = list(prompts)
        if a1111 is not None:
            body["a1111"] = list(a1111)
        if priority is not None:
            body["priority"] = priority
        if callback_url is not None:
            body["callback_url"] = callback_url
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/batches", json=body, headers=headers)  # type: ignore[no-any-return]

    def submit_stream(
        self,
        jobs: Iterable[dict[str, Any]],
        *,
        priority: int | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Submit jobs as NDJSON, streamed as they are produced (a 100,000-line file is fine)."""
        params: dict[str, Any] = {}
        if priority is not None:
            params["priority"] = priority
        if callback_url is not None:
            params["callback_url"] = callback_url
        headers = {"Content-Type": "application/x-ndjson"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self._json(  # type: ignore[no-any-return]
            "POST", "/v1/batches", content=_ndjson(jobs), params=params, headers=headers
        )

    # -- reading --------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")  # type: ignore[no-any-return]

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/batches/{batch_id}")  # type: ignore[no-any-return]

    def batches(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/batches", params={"limit": limit})["batches"]  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def jobs(
        self, batch_id: str, *, state: str | None = None, page: int = 500
    ) -> Iterator[dict[str, Any]]:
        cursor: int | None = 0
        while cursor is not None:
            params: dict[str, Any] = {"cursor": cursor, "limit": page}
            if state:
                params["state"] = state
            body = self._json("GET", f"/v1/batches/{batch_id}/jobs", params=params)
            yield from body["jobs"]
            cursor = body["next_cursor"]

    def manifest(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """The batch's manifest, one dict a job, streamed."""
        try:
            with self.http.stream("GET", f"/v1/batches/{batch_id}/manifest") as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as e:
            raise FarmUnreachable(f"cannot reach the farm at {self.http.base_url}: {e}") from e

    def image(self, job_id: str) -> bytes:
        response = self._request("GET", f"/v1/jobs/{job_id}/image")
        if response.status_code in (302, 307):
            try:
                fetched = httpx.get(response.headers["location"], timeout=self.http.timeout)
            except httpx.TransportError as e:
                raise FarmUnreachable(f"cannot download the image of {job_id}: {e}") from e
            if fetched.status_code != 200:
                raise FarmUnreachable(
                    f"the image of {job_id} could not be downloaded (HTTP {fetched.status_code})"
                )
            return fetched.content
        return response.content

    def workers(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/workers")["workers"]  # type: ignore[no-any-return]

    # -- changing your mind ---------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/batches/{batch_id}")  # type: ignore[no-any-return]

    def retry(self, batch_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/batches/{batch_id}/retry")  # type: ignore[no-any-return]

    # -- waiting --------------------------------------------------------------------------------

    def wait(
        self,
        batch_id: str,
        *,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until every job of the batch is final; returns the last batch status."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.batch(batch_id)
            if on_update:
                on_update(status)
            if sum(status["counts"][s] for s in FINAL) == status["total"]:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"batch {batch_id} not finished after {timeout_s}s: {status['counts']}"
                )
            time.sleep(poll_s)


def _raise_for(response: httpx.Response) -> None:
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


def _ndjson(jobs: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    piece: list[str] = []
    for job in jobs:
        piece.append(json.dumps(job, separators=(",", ":")))
        if len(piece) == _NDJSON_PIECE:
            yield ("\n".join(piece) + "\n").encode()
            piece = []
    if piece:
        yield ("\n".join(piece) + "\n").encode()
