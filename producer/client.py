"""A small client for the farm's HTTP API (httpx). Installs and runs without torch."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from shared.errors import FarmUnreachable, InvalidJob, SdfarmError, UnknownId

__all__ = ["FarmClient"]

log = logging.getLogger(__name__)
FINAL = ("succeeded", "failed", "cancelled")


class FarmClient:
    """Talks to `sdfarm api`. Errors come back as the farm's own error tree."""

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
        if response.status_code < 400 or response.status_code in (307, 302):
            return response
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:300]}
        message = body.get("error", response.reason_phrase)
        if response.status_code == 404:
            raise UnknownId(message)
        if response.status_code in (400, 413, 422):
            raise InvalidJob(message, body.get("problems"))
        if response.status_code >= 500:
            raise FarmUnreachable(f"the farm answered {response.status_code}: {message}")
        raise SdfarmError(f"the farm answered {response.status_code}: {message}")

    # -- calls ----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()  # type: ignore[no-any-return]

    def submit(
        self,
        jobs: Sequence[dict[str, Any]] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"defaults": defaults or {}}
        if jobs is not None:
            body["jobs"] = list(jobs)
        if prompts is not None:
            body["prompts"] = list(prompts)
        return self._request("POST", "/v1/batches", json=body).json()  # type: ignore[no-any-return]

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/batches/{batch_id}").json()  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()  # type: ignore[no-any-return]

    def jobs(
        self, batch_id: str, *, state: str | None = None, page: int = 500
    ) -> Iterator[dict[str, Any]]:
        cursor: int | None = 0
        while cursor is not None:
            params: dict[str, Any] = {"cursor": cursor, "limit": page}
            if state:
                params["state"] = state
            body = self._request("GET", f"/v1/batches/{batch_id}/jobs", params=params).json()
            yield from body["jobs"]
            cursor = body["next_cursor"]

    def image(self, job_id: str) -> bytes:
        response = self._request("GET", f"/v1/jobs/{job_id}/image")
        if response.status_code in (302, 307):
            try:
                fetched = httpx.get(response.headers["location"], timeout=self.http.timeout)
            except httpx.TransportError as e:
                raise FarmUnreachable(f"cannot download the image of {job_id}: {e}") from e
            fetched.raise_for_status()
            return fetched.content
        return response.content

    def workers(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/workers").json()["workers"]  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()  # type: ignore[no-any-return]

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

    def fetch(self, batch_id: str, out_dir: Path) -> list[Path]:
        """Download every succeeded image; files already there and intact are skipped."""
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for job in self.jobs(batch_id, state="succeeded"):
            path = out_dir / f"{job['job_id']}.png"
            expected = (job.get("result") or {}).get("bytes")
            if path.exists() and expected == path.stat().st_size and _is_png(path):
                written.append(path)
                continue
            data = self.image(job["job_id"])
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(path)
            log.info("fetched %s (%s)", path, hashlib.sha256(data).hexdigest()[:10])
            written.append(path)
        return written


def _is_png(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"
