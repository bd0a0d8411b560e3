"""Loads and saves on the request path go first; the cascade down the chain yields.

An engine waits on a load (its prefill starts after it) and on a save into the first
tier; nothing waits on the write-through cascade below. Run at the same moment they
share the CPUs, the memory bus and the disk: a cascade writing host blocks to disk
while a load copies host blocks into the engine and reads others from that disk slows
the load (measured in ``kvbm bench``: onboard p50 101-107 ms beside it, 80-88 ms with
the cascade waiting). So each part of a cascade's write first waits while any load or
save is in flight, at most ``background_yield_ms`` a part, so the cascade always moves.

A network tier (S3) writes a cascade batch as one part: a part boundary would drain
its requests in flight. It pauses before each request instead (``request_pause``):
no new PUT leaves while a load is in flight, and the batch's pauses together end by
one ``background_yield_ms`` deadline. Its uploads took the object store's CPU and the
link from the loads' GETs (``kvbm bench --local s3``: onboard p50 479-536 ms beside
them, 290-354 ms with them paused).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
_here = threading.local()


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
        return self.wait_until(time.monotonic() + self.max_wait_s)

    def wait_until(self, end: float) -> float:
        """Wait while a load or save is in flight, until ``time.monotonic()`` reaches
        ``end`` at the latest; seconds waited."""
        t0 = time.perf_counter()
        with self._cv:
            while self._n:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
        return time.perf_counter() - t0

    def in_parts(self, write: Callable[[int, int], list[T]], n: int,
                 part: int) -> tuple[list[T], float]:
        """A cascade's write: ``write(a, b)`` for positions ``a:b`` of ``range(n)`` in
        parts of ``part``, each after ``yield_to``; the parts' answers in order, and the
        seconds waited. ``part`` 0 (``Tier.cascade_part_blocks``): one call of all,
        whose tier pauses before each request it sends instead (``request_pause``)."""
        with self.background() as paused:
            if part <= 0:
                return (write(0, n) if n else []), paused.waited
            out: list[T] = []
            waited = 0.0
            for a in range(0, n, part):
                waited += self.yield_to()
                out += write(a, min(n, a + part))
            return out, waited + paused.waited

    @contextmanager
    def background(self) -> Iterator[Pauses]:
        """Mark this thread's tier write as the cascade's (``in_parts``): a tier that
        sends a batch's requests itself asks ``request_pause()`` and pauses before each."""
        prev = getattr(_here, "pauses", None)
        p = _here.pauses = Pauses(self)
        try:
            yield p
        finally:
            _here.pauses = prev


class Pauses:
    """One cascade write's pauses before each of its requests: each waits while a load
    or save is in flight, and all of them end by one deadline, ``max_wait_s`` after the
    first began, so the write always moves. ``waited``: the seconds during which at
    least one request was paused (not the path's time)."""

    def __init__(self, fg: Foreground) -> None:
        self._fg = fg
        self._lock = threading.Lock()
        self._end: float | None = None
        self._paused = 0
        self._since = 0.0
        self.waited = 0.0

    def __call__(self) -> float:
        """Wait before one request; the seconds this request waited."""
        fg = self._fg
        if not fg.in_flight or fg.max_wait_s <= 0:
            return 0.0
        with self._lock:
            if self._end is None:
                self._end = time.monotonic() + fg.max_wait_s
            end = self._end
            if not self._paused:
                self._since = time.perf_counter()
            self._paused += 1
        try:
            return fg.wait_until(end)
        finally:
            with self._lock:
                self._paused -= 1
                if not self._paused:
                    self.waited += time.perf_counter() - self._since


def request_pause() -> Pauses | None:
    """Inside a cascade's tier write (``Foreground.background``), called from the
    thread that called the tier's ``write``: the pause to take before each request
    the tier sends; None in a save or a read (nothing to yield to)."""
    return getattr(_here, "pauses", None)
