"""What every local service (Redis, SeaweedFS) is: a managed process, its port and its data.

Each service module builds one of these with the command line, the port and the readiness probe
it needs; starting, stopping and restarting it again over the same data are the same for all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from producer.processes import ManagedProcess

__all__ = ["Service"]

log = logging.getLogger(__name__)


@dataclass
class Service:
    """A service process and how to start it again: same command line, port and data."""

    process: ManagedProcess
    port: int
    data_dir: Path

    def start(self, timeout_s: float = 60.0) -> None:
        """Start and wait until ready; a service that does not come up is stopped again."""
        self.process.start()
        try:
            self.process.wait_ready(timeout_s)
        except BaseException:
            self.process.stop()
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        self.process.stop(timeout_s)

    def restart(self, timeout_s: float = 60.0) -> None:
        self.stop()
        self.start(timeout_s)
