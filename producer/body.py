"""Reading a submission's body: within its size limit and its deadlines, and, for NDJSON, a job
object a line, parsed as the lines arrive.

Every wait for the next piece of the body is bounded by `body_idle_timeout_s`, and the whole body
by `body_timeout_s`: a client that stops sending gets a 408 and its connection is closed
(`Connection: close`, since the rest of its body will never be read). Reading happens on the
event loop, so a stalled upload holds no thread while it waits.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request

from producer.farm import ApiError
from shared.config import Settings
from shared.errors import InvalidJob

__all__ = ["Body", "ndjson_batches", "too_large"]


class Body:
    """Counts and hashes the body as it streams in; refuses it past the size limit (413) or
    when it stalls (408)."""

    def __init__(self, request: Request, settings: Settings) -> None:
        self.request = request
        self.limit = settings.max_body_bytes
        self.idle_s = settings.body_idle_timeout_s
        self.total_s = settings.body_timeout_s
        self.size = 0
        self.sha256 = hashlib.sha256()

    async def chunks(self) -> AsyncIterator[bytes]:
        stream = self.request.stream()
        deadline = time.monotonic() + self.total_s
        while True:
            left = deadline - time.monotonic()
            wait = min(self.idle_s, left)
            try:
                with anyio.fail_after(max(0.0, wait)):
                    chunk = await anext(stream, None)
            except TimeoutError:
                raise _timed_out(self.size, self.idle_s if wait < left else None) from None
            if chunk is None:
                return
            self.size += len(chunk)
            if self.size > self.limit:
                raise too_large(self.limit)
            self.sha256.update(chunk)
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"the request body is larger than {limit} bytes (setting max_body_bytes); split it"
    )


def _timed_out(received: int, idle_s: float | None) -> ApiError:
    why = (
        f"sent nothing for {idle_s:g} s (setting body_idle_timeout_s)"
        if idle_s is not None
        else "took longer than body_timeout_s to arrive"
    )
    return ApiError(
        408,
        f"the request body {why} after {received} bytes; nothing of it was kept, send it again",
        {"Connection": "close"},
    )


async def ndjson_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[dict[str, Any]]]:
    """Job objects, one list per network chunk; line N of the body is job N-1."""
    rest, line_no = b"", 0
    async for chunk in chunks:
        *lines, rest = (rest + chunk).split(b"\n")
        jobs = []
        for line in lines:
            line_no += 1
            jobs.append(_parse_line(line, line_no))
        yield jobs
    if rest.strip():
        yield [_parse_line(rest, line_no + 1)]


def _parse_line(line: bytes, line_no: int) -> dict[str, Any]:
    if not line.strip():
        raise InvalidJob(
            f"line {line_no} is empty; an NDJSON body holds one job object a line",
            [{"line": line_no, "field": None, "message": "empty line"}],
        )
    try:
        job = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise InvalidJob(
            f"line {line_no}: not valid JSON ({reason})",
            [{"line": line_no, "field": None, "message": reason}],
        ) from e
    if not isinstance(job, dict):
        raise InvalidJob(
            f"line {line_no}: each line must be a JSON object, got {type(job).__name__}",
            [{"line": line_no, "field": None, "message": "not an object"}],
        )
    return job
