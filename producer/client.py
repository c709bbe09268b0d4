"""A small client for the farm's HTTP API (httpx). Installs and runs without torch.

`AsyncFarmClient` (`producer.async_client`) has the same methods for asyncio code; both build their
requests, read their answers and map errors in `producer.client_core`.

Errors come back as the farm's own error tree: a refused field is `InvalidJob`, an unknown id
`UnknownId`, a missing or wrong key `AccessDenied`, an unreachable or failing farm
`FarmUnreachable`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Unpack

import httpx

from producer.client_core import (
    FINAL,
    Call,
    Routes,
    Waiting,
    checked_image,
    download_failed,
    http_options,
    ndjson,
    raise_for,
    unreachable,
    upload_call,
)
from producer.client_types import (
    BatchCancelled,
    BatchStatus,
    Health,
    JobCancelled,
    JobStatus,
    Retried,
    SubmitOptions,
    Submitted,
    WorkerInfo,
)
from producer.download import FetchReport, fetch_batch

__all__ = ["FINAL", "FarmClient"]

log = logging.getLogger(__name__)


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
        self.http = httpx.Client(**http_options(api_url, api_key, timeout_s), transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FarmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: Call, **extra: Any) -> httpx.Response:
        try:
            response = self.http.request(call.method, call.path, **call.send_args(), **extra)
        except httpx.TransportError as e:
            raise unreachable(self.http.base_url, e) from e
        raise_for(response)
        return response

    def _json(self, call: Call) -> Any:
        return self._send(call).json()

    # -- submitting -----------------------------------------------------------------------------

    def submit(
        self, jobs: Sequence[dict[str, Any]] | None = None, **options: Unpack[SubmitOptions]
    ) -> Submitted:
        """Submit a batch as one JSON body (`jobs`, `prompts` or A1111 infotexts `a1111`, with
        `defaults`, `priority`, `callback_url`, `idempotency_key`)."""
        return self._json(Routes.submit(jobs, options))  # type: ignore[no-any-return]

    def submit_stream(
        self, jobs: Iterable[dict[str, Any]], **options: Unpack[SubmitOptions]
    ) -> Submitted:
        """Submit jobs as NDJSON, streamed as they are produced (a 100,000-line file is fine)."""
        response = self._send(Routes.submit_stream(options), content=ndjson(jobs))
        return response.json()  # type: ignore[no-any-return]

    def upload(self, image: Path | bytes) -> str:
        """Store an init image (a PNG or JPEG file, or its bytes) once in the farm; returns the
        reference a job names it by in `init_image` (`upload:TENANT/sha256:HEX`)."""
        call, data = upload_call(image)
        return str(self._send(call, content=data).json()["ref"])

    # -- reading --------------------------------------------------------------------------------

    def health(self) -> Health:
        return self._json(Routes.health())  # type: ignore[no-any-return]

    def batch(self, batch_id: str) -> BatchStatus:
        return self._json(Routes.batch(batch_id))  # type: ignore[no-any-return]

    def batches(self, limit: int = 50) -> list[BatchStatus]:
        return self._json(Routes.batches(limit))["batches"]  # type: ignore[no-any-return]

    def job(self, job_id: str) -> JobStatus:
        return self._json(Routes.job(job_id))  # type: ignore[no-any-return]

    def jobs(
        self, batch_id: str, *, state: str | None = None, page: int = 500
    ) -> Iterator[JobStatus]:
        cursor: int | None = 0
        while cursor is not None:
            body = self._json(Routes.jobs_page(batch_id, cursor, state, page))
            yield from body["jobs"]
            cursor = body["next_cursor"]

    def manifest(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """The batch's manifest, one dict a job, streamed."""
        call = Routes.manifest(batch_id)
        try:
            with self.http.stream(call.method, call.path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise_for(response)
                for line in response.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as e:
            raise unreachable(self.http.base_url, e) from e

    def image(self, job_id: str) -> bytes:
        response = self._send(Routes.image(job_id))
        if response.status_code not in (302, 307):
            return response.content
        try:
            fetched = httpx.get(response.headers["location"], timeout=self.http.timeout)
        except httpx.TransportError as e:
            raise download_failed(job_id, e) from e
        return checked_image(job_id, fetched)

    def workers(self) -> list[WorkerInfo]:
        return self._json(Routes.workers())["workers"]  # type: ignore[no-any-return]

    # -- changing your mind ---------------------------------------------------------------------

    def cancel(self, job_id: str) -> JobCancelled:
        return self._json(Routes.cancel(job_id))  # type: ignore[no-any-return]

    def cancel_batch(self, batch_id: str) -> BatchCancelled:
        return self._json(Routes.cancel_batch(batch_id))  # type: ignore[no-any-return]

    def retry(self, batch_id: str) -> Retried:
        return self._json(Routes.retry(batch_id))  # type: ignore[no-any-return]

    # -- waiting and downloading ----------------------------------------------------------------

    def wait(
        self,
        batch_id: str,
        *,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        on_update: Callable[[BatchStatus], object] | None = None,
    ) -> BatchStatus:
        """Poll until every job of the batch is final; returns the last batch status.
        `on_update` gets every status polled; TimeoutError after `timeout_s`."""
        waiting = Waiting(batch_id, timeout_s)
        while True:
            status = self.batch(batch_id)
            if on_update is not None:
                on_update(status)
            if waiting.over(status):
                return status
            time.sleep(poll_s)

    def fetch(
        self,
        batch_id: str,
        out_dir: Path,
        *,
        on_file: Callable[[Path, bool], object] | None = None,
    ) -> FetchReport:
        """Download the batch's succeeded images and its manifest into `out_dir`, skipping
        intact files (`sdfarm fetch`); `on_file(path, was_intact)` after each image."""
        return fetch_batch(self, batch_id, out_dir, on_file=on_file)
