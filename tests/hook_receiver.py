"""A webhook receiver for tests and the fault suite: a real HTTP server on 127.0.0.1 that
records every POST (when, headers, body) and answers 204."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Post", "Receiver", "receiving"]


@dataclass(frozen=True)
class Post:
    at: float  # time.monotonic() when it came
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    posts: list[Post] = field(default_factory=list)


@contextmanager
def receiving() -> Iterator[Receiver]:
    """A receiver listening until the block ends."""
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.posts.append(Post(time.monotonic(), dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:  # keep the output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/sdfarm"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
