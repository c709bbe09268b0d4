"""The farm's client for asyncio code (httpx's AsyncClient): `FarmClient`'s methods, awaited.

    async with AsyncFarmClient(url, key) as farm:
        submitted = await farm.submit(prompts=["a lighthouse"])
        status = await farm.wait(submitted["batch_id"], on_update=show)
        report = await farm.fetch(submitted["batch_id"], Path("out"))

Requests, answers and errors are `producer.client_core`'s, as for `FarmClient`. The progress
callbacks (`on_update`, `on_file`) may be plain functions or coroutine functions.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Unpack

import httpx

from producer.client_core import (
    Call,
    NdjsonPieces,
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
from producer.download import FetchReport, ManifestFile, local_image, save_image, start_fetch

__all__ = ["AsyncFarmClient"]

log = logging.getLogger(__name__)


class AsyncFarmClient:
    """Talks to `sdfarm api` from asyncio code."""

    def __init__(
        self,
        api_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        options = http_options(api_url, api_key, timeout_s)
        self.http = httpx.AsyncClient(**options, transport=transport)

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncFarmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, call: Call, **extra: Any) -> httpx.Response:
        try:
            response = await self.http.request(call.method, call.path, **call.send_args(), **extra)
        except httpx.TransportError as e:
            raise unreachable(self.http.base_url, e) from e
        raise_for(response)
        return response

    async def _json(self, call: Call) -> Any:
        return (await self._send(call)).json()

    # -- submitting -----------------------------------------------------------------------------

    async def submit(
        self, jobs: Sequence[dict[str, Any]] | None = None, **options: Unpack[SubmitOptions]
    ) -> Submitted:
        """Submit a batch as one JSON body (`jobs`, `prompts` or A1111 infotexts `a1111`, with
        `defaults`, `priority`, `callback_url`, `idempotency_key`)."""
        return await self._json(Routes.submit(jobs, options))  # type: ignore[no-any-return]

    async def submit_stream(
        self,
        jobs: Iterable[dict[str, Any]] | AsyncIterable[dict[str, Any]],
        **options: Unpack[SubmitOptions],
    ) -> Submitted:
        """Submit jobs as NDJSON, streamed as they are produced (from an iterable or an async
        iterable)."""
        body = _ndjson_stream(jobs)
        response = await self._send(Routes.submit_stream(options), content=body)
        return response.json()  # type: ignore[no-any-return]

    async def upload(self, image: Path | bytes) -> str:
        """Store an init image (a PNG or JPEG file, or its bytes) once in the farm; returns the
        reference a job names it by in `init_image` (`upload:TENANT/sha256:HEX`)."""
        call, data = await asyncio.to_thread(upload_call, image)
        return str((await self._send(call, content=data)).json()["ref"])

    # -- reading --------------------------------------------------------------------------------

    async def health(self) -> Health:
        return await self._json(Routes.health())  # type: ignore[no-any-return]

    async def batch(self, batch_id: str) -> BatchStatus:
        return await self._json(Routes.batch(batch_id))  # type: ignore[no-any-return]

    async def batches(self, limit: int = 50) -> list[BatchStatus]:
        return (await self._json(Routes.batches(limit)))["batches"]  # type: ignore[no-any-return]

    async def job(self, job_id: str) -> JobStatus:
        return await self._json(Routes.job(job_id))  # type: ignore[no-any-return]

    async def jobs(
        self, batch_id: str, *, state: str | None = None, page: int = 500
    ) -> AsyncIterator[JobStatus]:
        cursor: int | None = 0
        while cursor is not None:
            body = await self._json(Routes.jobs_page(batch_id, cursor, state, page))
            for job in body["jobs"]:
                yield job
            cursor = body["next_cursor"]

    async def manifest(self, batch_id: str) -> AsyncIterator[dict[str, Any]]:
        """The batch's manifest, one dict a job, streamed."""
        call = Routes.manifest(batch_id)
        try:
            async with self.http.stream(call.method, call.path) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise_for(response)
                async for line in response.aiter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as e:
            raise unreachable(self.http.base_url, e) from e

    async def image(self, job_id: str) -> bytes:
        response = await self._send(Routes.image(job_id))
        if response.status_code not in (302, 307):
            return response.content
        try:
            # The presigned URL is another host's: no base URL, no API key.
            async with httpx.AsyncClient(timeout=self.http.timeout) as plain:
                fetched = await plain.get(response.headers["location"])
        except httpx.TransportError as e:
            raise download_failed(job_id, e) from e
        return checked_image(job_id, fetched)

    async def workers(self) -> list[WorkerInfo]:
        return (await self._json(Routes.workers()))["workers"]  # type: ignore[no-any-return]

    # -- changing your mind ---------------------------------------------------------------------

    async def cancel(self, job_id: str) -> JobCancelled:
        return await self._json(Routes.cancel(job_id))  # type: ignore[no-any-return]

    async def cancel_batch(self, batch_id: str) -> BatchCancelled:
        return await self._json(Routes.cancel_batch(batch_id))  # type: ignore[no-any-return]

    async def retry(self, batch_id: str) -> Retried:
        return await self._json(Routes.retry(batch_id))  # type: ignore[no-any-return]

    # -- waiting and downloading ----------------------------------------------------------------

    async def wait(
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
            status = await self.batch(batch_id)
            if on_update is not None:
                await _called(on_update, status)
            if waiting.over(status):
                return status
            await asyncio.sleep(poll_s)

    async def fetch(
        self,
        batch_id: str,
        out_dir: Path,
        *,
        on_file: Callable[[Path, bool], object] | None = None,
    ) -> FetchReport:
        """Download the batch's succeeded images and its manifest into `out_dir`, skipping
        intact files (`sdfarm fetch`); `on_file(path, was_intact)` after each image."""
        report = start_fetch(batch_id, out_dir)
        async for job in self.jobs(batch_id, state="succeeded"):
            path, intact = local_image(job, batch_id, out_dir)
            if not intact:
                save_image(path, await self.image(path.stem), batch_id)
            report.add(path, intact)
            if on_file is not None:
                await _called(on_file, path, intact)
        with ManifestFile(out_dir) as manifest:
            async for line in self.manifest(batch_id):
                manifest.write(line)
        report.manifest = manifest.path
        return report


async def _called(callback: Callable[..., object], *args: Any) -> None:
    """Call a progress callback; await what it returns if it is a coroutine function's."""
    outcome = callback(*args)
    if inspect.isawaitable(outcome):
        await outcome


async def _ndjson_stream(
    jobs: Iterable[dict[str, Any]] | AsyncIterable[dict[str, Any]],
) -> AsyncIterator[bytes]:
    if not isinstance(jobs, AsyncIterable):
        for whole in ndjson(jobs):
            yield whole
        return
    pieces = NdjsonPieces()
    async for job in jobs:
        if piece := pieces.add(job):
            yield piece
    if last := pieces.rest():
        yield last
