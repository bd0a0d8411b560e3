"""A circuit breaker: a dead object store costs one fast refusal, not a timeout per block.

``closed``: requests flow; ``failures`` consecutive failed requests open it.
``open``: every request is refused at once (the tier reports misses and skipped
writes) until the cool-down passes. ``half_open``: one trial request is let through;
its success closes the breaker, its failure opens it again for twice as long (up to
a cap). So the tier resumes by itself when the server comes back, within one
cool-down, and a dead server is asked once per cool-down instead of once per block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Thread-safe breaker over consecutive request failures."""

    def __init__(
        self,
        failures: int = 5,
        cooldown_s: float = 1.0,
        max_cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max(cooldown_s, max_cooldown_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._consecutive = 0
        self._cooldown_s = cooldown_s
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.opens = 0
        self.rejections = 0

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (open whose cool-down has passed)."""
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self._cooldown_s:
                return HALF_OPEN
            return self._state

    def allow(self) -> bool:
        """May a request go out now? Counts a refusal when not."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN and self._clock() - self._opened_at >= self._cooldown_s:
                self._state = HALF_OPEN
                self._trial_in_flight = False
            if self._state == HALF_OPEN and not self._trial_in_flight:
                # Exactly one trial at a time: a still-dead server costs one request.
                self._trial_in_flight = True
                return True
            self.rejections += 1
            return False

    def success(self) -> None:
        """A request reached the server and got an answer (any answer but a 5xx)."""
        with self._lock:
            self._consecutive = 0
            if self._state != CLOSED:
                self._state = CLOSED
                self._cooldown_s = self.base_cooldown_s
                self._trial_in_flight = False

    def failure(self) -> None:
        """A request failed in transport (refused, timed out, cut off) or with a 5xx."""
        with self._lock:
            self._consecutive += 1
            if self._state == HALF_OPEN:
                self._cooldown_s = min(self._cooldown_s * 2, self.max_cooldown_s)
                self._open()
            elif self._state == CLOSED and self._consecutive >= self.failures:
                self._open()

    def _open(self) -> None:
        self._state = OPEN
        self._opened_at = self._clock()
        self._trial_in_flight = False
        self.opens += 1
