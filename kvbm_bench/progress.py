"""``kvbm bench``'s progress: every phase reports from its first second, with an ETA.

On a terminal one line is redrawn in place; otherwise (a pipe, a CI log) a line is
written when a phase starts and then at most once a second. The ETA is the current
phase's (from its own rate, or its time bound) plus a rough estimate of the phases
still to come, shown as ``~``.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def _secs(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min"


class Progress:
    """Phases of known step counts; ``step`` after each unit of work."""

    def __init__(self, phases: list[str], enabled: bool = True, stream: TextIO | None = None,
                 interval: float = 1.0) -> None:
        self.phases = phases
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.t0 = time.perf_counter()
        self.index = -1
        self.name = ""
        self.total = 1
        self.n = 0
        self.deadline: float | None = None
        self.later: dict[str, float] = {}  # seconds still expected in the phases to come
        self.phase_t0 = self.t0
        self.last = 0.0
        self.text = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if enabled:
            # A phase that takes a while between steps (building a chain, a flush, fio)
            # is still seen to move: the line is redrawn with its clock at least every
            # second on a terminal, every ``2 * interval`` in a log.
            self._ticker = threading.Thread(target=self._tick, name="kvbm-bench-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        period = self.interval if self.tty else 2 * self.interval
        while not self._stop.wait(min(period, 1.0)):
            if time.perf_counter() - self.last >= period and self.index >= 0:
                self._draw(force=True)

    def estimate(self, phase: str, seconds: float) -> None:
        """A rough duration of a phase still to come, for the overall ETA."""
        self.later[phase] = max(0.0, seconds)

    def phase(self, name: str, total: int, deadline_s: float | None = None, text: str = "") -> None:
        """Start phase ``name`` of ``total`` steps (at most ``deadline_s`` seconds)."""
        self.index = self.phases.index(name) if name in self.phases else self.index + 1
        self.later.pop(name, None)
        self.name, self.total, self.n = name, max(total, 1), 0
        self.deadline = deadline_s
        self.phase_t0 = time.perf_counter()
        self.text = text
        self._draw(force=True)

    def step(self, text: str = "", n: int = 1) -> None:
        """``n`` more steps of the current phase done."""
        self.n = min(self.total, self.n + n)
        self.text = text
        self._draw()

    def eta(self) -> float:
        """Seconds left: this phase's from its rate or its bound, plus the later phases'."""
        el = time.perf_counter() - self.phase_t0
        left = el / self.n * (self.total - self.n) if self.n else 0.0
        if self.deadline is not None:
            left = min(left, max(0.0, self.deadline - el)) if self.n else max(0.0, self.deadline - el)
        return left + sum(self.later.values())

    def line(self) -> str:
        """The progress line as it is drawn now."""
        frac = self.n / self.total
        bar = "#" * int(frac * 20)
        el = time.perf_counter() - self.t0
        return (f"[{bar:<20}] phase {self.index + 1}/{len(self.phases)} {self.name} "
                f"{self.n}/{self.total}  {_secs(el)} elapsed, ETA ~{_secs(self.eta())}"
                + (f"  {self.text}" if self.text else ""))

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = time.perf_counter()
            if not force and now - self.last < (0.1 if self.tty else self.interval):
                return
            self.last = now
            if self.tty:
                self.stream.write("\r\x1b[2K" + self.line()[:160])
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Stop redrawing (also on an error: no line after the traceback)."""
        self._stop.set()

    def done(self) -> None:
        """The end: the total time, on its own line."""
        self.close()
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        with self._lock:
            self.stream.write(("\r\x1b[2K" if self.tty else "") + f"kvbm bench: done in {_secs(el)}\n")
            self.stream.flush()
