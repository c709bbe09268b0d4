"""The liveness of an API process's background loops (dispatcher, finisher, webhook sender).

Each loop runs in its own thread under `supervise`, with its own stop event, a `LoopPulse`: a
`threading.Event` that also notes the time whenever the loop checks it at the top of an
iteration. The first check after a (re)start is where the loop begins; each later one ends an
iteration, so `last_beat` is when the loop last completed one. A loop that raises is logged,
backed off (doubling, capped) and started again; one that keeps failing, or hangs inside an
iteration, stops beating, and `/healthz` reports it stalled once `loop_stall_s` passed.

Nothing here touches Redis: `/healthz` reads these in-process values and answers at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff", "LoopPulse", "LoopState", "supervise"]

log = logging.getLogger(__name__)

BACKOFF_S = 0.5  # the first wait after a loop failed; it doubles at each failure in a row
BACKOFF_MAX_S = 15.0  # ... up to this, well under the default `loop_stall_s`


class Backoff:
    """Waits that double after each failure in a row, and start over after a success."""

    def __init__(self, first_s: float = BACKOFF_S, max_s: float = BACKOFF_MAX_S) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.failures = 0

    def next_s(self) -> float:
        """The wait after one more failure."""
        self.failures += 1
        return float(min(self.max_s, self.first_s * 2 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class LoopState:
    """What /healthz shows of one loop."""

    alive: bool
    last_iteration_s_ago: float
    restarts: int
    last_error: str | None


class LoopPulse(threading.Event):
    """A loop's stop event that notes when the loop last completed an iteration."""

    def __init__(self, name: str, stall_s: float) -> None:
        super().__init__()
        self.name = name
        self.stall_s = stall_s
        self.last_beat = time.monotonic()
        self.restarts = 0
        self.last_error: str | None = None
        self.thread: threading.Thread | None = None
        self._begun = False  # False until the first check after a (re)start

    def is_set(self) -> bool:
        if self._begun:
            self.last_beat = time.monotonic()
        self._begun = True
        return super().is_set()

    def stopping(self) -> bool:
        """`is_set` without a beat, for the supervisor."""
        return super().is_set()

    def restarted(self, error: str) -> None:
        self.restarts += 1
        self.last_error = error
        self._begun = False

    def state(self, now: float | None = None) -> LoopState:
        age = (time.monotonic() if now is None else now) - self.last_beat
        running = self.thread is None or self.thread.is_alive() or self.stopping()
        return LoopState(
            alive=running and age <= self.stall_s,
            last_iteration_s_ago=round(age, 3),
            restarts=self.restarts,
            last_error=self.last_error,
        )


def supervise(loop: Callable[[threading.Event], None], pulse: LoopPulse) -> None:
    """Run `loop(pulse)` until `pulse` is set, starting it again after any exception."""
    backoff = Backoff()
    while not pulse.stopping():
        started = time.monotonic()
        try:
            loop(pulse)
        except Exception as e:
            if time.monotonic() - started > BACKOFF_MAX_S:
                backoff.reset()  # it ran a good while: not a failure in a row
            wait_s = backoff.next_s()
            log.exception("%s loop failed; starting it again in %.1f s", pulse.name, wait_s)
            pulse.restarted(f"{type(e).__name__}: {e}"[:200])
            pulse.wait(wait_s)
        else:
            if not pulse.stopping():  # a loop returns only when asked to stop
                log.error("%s loop returned while not asked to stop; starting it again", pulse.name)
                pulse.restarted("returned while not asked to stop")
                pulse.wait(BACKOFF_S)
