"""Loads and saves on the request path go first; the cascade down the chain yields.

An engine waits on a load (its prefill starts after it) and on a save into the first
tier; nothing waits on the write-through cascade below. Run at the same moment they
share the CPUs, the memory bus and the disk: a cascade writing host blocks to disk
while a load copies host blocks into the engine and reads others from that disk slows
the load (measured in ``kvbm bench``: onboard p50 101-107 ms beside it, 80-88 ms with
the cascade waiting). So each part of a cascade's write first waits while any load or
save is in flight, at most ``background_yield_ms`` a part, so the cascade always moves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class Foreground:
    """Counts the loads and saves in flight; ``yield_to`` waits for none to be."""

    def __init__(self, max_wait_s: float) -> None:
        self.max_wait_s = max(0.0, float(max_wait_s))
        self._n = 0
        self._cv = threading.Condition()

    @property
    def in_flight(self) -> int:
        return self._n

    @contextmanager
    def active(self) -> Iterator[None]:
        """Mark one load or save on the request path for the time of the block."""
        with self._cv:
            self._n += 1
        try:
            yield
        finally:
            with self._cv:
                self._n -= 1
                if not self._n:
                    self._cv.notify_all()

    def yield_to(self) -> float:
        """Wait while a load or save is in flight, at most ``max_wait_s``; seconds waited."""
        if not self._n or self.max_wait_s <= 0:
            return 0.0
        t0 = time.perf_counter()
        end = time.monotonic() + self.max_wait_s
        with self._cv:
            while self._n:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
        return time.perf_counter() - t0

    def in_parts(self, write: Callable[[int, int], list[T]], n: int,
                 part: int) -> tuple[list[T], float]:
        """``write(a, b)`` for positions ``a:b`` of ``range(n)`` in parts of ``part``,
        each after ``yield_to``; the parts' answers in order, and the seconds waited.
        ``part`` 0: one call of all, without waiting (``Tier.cascade_part_blocks``)."""
        if part <= 0:
            return (write(0, n) if n else []), 0.0
        out: list[T] = []
        waited = 0.0
        for a in range(0, n, part):
            waited += self.yield_to()
            out += write(a, min(n, a + part))
        return out, waited
