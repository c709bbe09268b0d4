"""Child processes for the local farm: free ports, and a process with a log, a readiness probe
and a clean stop.

Each child runs in its own process group, so Ctrl-C in a terminal reaches only `sdfarm up`, which
then stops the children in order, and stopping a child also stops anything it spawned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from shared.errors import ServiceStartError

__all__ = ["ManagedProcess", "free_port", "free_port_pairs"]

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 30  # how much of a dead service's log goes into the error message
POLL_INTERVAL_S = 0.05  # between readiness probes; probes are cheap local connects


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_pairs(count: int, offset: int) -> list[int]:
    """`count` distinct free ports P whose P + offset is free too (sockets held until all found)."""
    with contextlib.ExitStack() as stack:
        chosen: list[int] = []
        for _ in range(100 * count):
            http = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            http.bind(("127.0.0.1", 0))
            port = http.getsockname()[1]
            if port + offset > 65535:
                continue
            twin = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                twin.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise ServiceStartError(f"could not find {count} free ports P with P + {offset} free too")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a child is created, then deliver them.

    A Ctrl-C that lands between the fork and the moment Popen hands back the child would leave
    a process running that nobody knows to stop. (Python runs handlers in the main thread only.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda caught, _frame: held.append(caught))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: installed outside Python, nothing to restore
                signal.signal(signum, handler)
        for caught in held:
            signal.raise_signal(caught)


class ManagedProcess:
    """A child process with its output in a log file, a readiness probe and a clean stop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        ready: Callable[[], Any] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_dir) / f"{name}.log"
        self.ready = ready
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        """Launch the process (again, after a stop); its output is appended to the log file."""
        if self.is_running():
            raise ServiceStartError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The child keeps its own copy of the log's descriptor; ours can close right away.
        with self.log_path.open("ab") as log_file, _signals_held():
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        log.info("started %s (pid %d): %s", self.name, self._popen.pid, " ".join(self.argv))
        return self

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise ServiceStartError(f"{self.name} was never started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended, else None."""
        return None if self._popen is None else self._popen.poll()

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Poll the readiness probe until it passes; return the seconds it took.

        Raises ServiceStartError with the tail of the log if the process exits first or the
        probe still fails after `timeout_s`.
        """
        started = time.monotonic()
        last_error: BaseException | None = None
        while True:
            if not self.is_running():
                raise ServiceStartError(
                    f"{self.name} exited with status {self.returncode} before it was ready; "
                    f"the end of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if self.ready is None or self.ready() is not False:
                    elapsed = time.monotonic() - started
                    log.info("%s ready after %.2f s", self.name, elapsed)
                    return elapsed
            except Exception as e:
                last_error = e
            if time.monotonic() - started > timeout_s:
                raise ServiceStartError(
                    f"{self.name} was not ready after {timeout_s:.0f} s "
                    f"(last probe error: {last_error!r}); the end of {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout_s`; return the exit status."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0f s; killing it", self.name, timeout_s)
                self._signal(signal.SIGKILL)
                self._popen.wait()
        else:
            # The leader is gone but something it spawned may still hold a port.
            self._signal(signal.SIGKILL)
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL the process group at once, as a crash or power loss would (for fault tests)."""
        if self._popen is None:
            return
        self._signal(signal.SIGKILL)
        self._popen.wait()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_bytes()[-16384:].decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, signum: signal.Signals) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signum)  # start_new_session made pid the group id

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self.returncode}"
        return f"<ManagedProcess {self.name} {state}>"
