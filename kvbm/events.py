"""Block lifecycle events, published to subscribers off the data path.

Publishing is a flag test when nobody subscribes. With subscribers, each manager
operation hands its events over as one batch to a bounded queue; a daemon thread
delivers them. A slow subscriber makes the queue fill and later batches are dropped
(and counted), so the data path never waits; a failing subscriber is logged and
skipped.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .hashing import SequenceHash

log = logging.getLogger("kvbm.events")


class EventKind(str, enum.Enum):
    """A block's transitions in one tier."""

    ALLOCATED = "allocated"
    REGISTERED = "registered"
    MATCHED = "matched"
    EVICTED = "evicted"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class BlockEvent:
    """One transition of a batch of blocks in one tier."""

    kind: EventKind
    tier: str
    hashes: tuple[SequenceHash, ...]
    timestamp: float


Subscriber = Callable[[Sequence[BlockEvent]], None]


class EventBus:
    """Fan-out of block events to subscribers on a background thread."""

    def __init__(self, max_pending_batches: int = 1024) -> None:
        self._subs: list[Subscriber] = []
        self._queue: queue.Queue[list[BlockEvent] | None] = queue.Queue(max_pending_batches)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.active = False
        self.dropped_batches = 0
        self.failed_deliveries = 0

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Deliver every later batch of events to ``callback``; return an unsubscribe function."""
        with self._lock:
            self._subs = [*self._subs, callback]
            self.active = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvbm-events", daemon=True)
                self._thread.start()

        def unsubscribe() -> None:
            with self._lock:
                self._subs = [s for s in self._subs if s is not callback]
                self.active = bool(self._subs)

        return unsubscribe

    def publish(self, events: list[BlockEvent]) -> None:
        """Hand a batch over without waiting; drop it (counted) if the queue is full."""
        if not self.active or not events:
            return
        try:
            self._queue.put_nowait(events)
        except queue.Full:
            self.dropped_batches += 1

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            for sub in self._subs:
                try:
                    sub(batch)
                except Exception:  # a broken subscriber must not stop delivery to others
                    self.failed_deliveries += 1
                    log.exception("kvbm event subscriber %r failed; skipped", sub)
            self._queue.task_done()

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until every published batch was delivered (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.001)

    def close(self) -> None:
        """Stop the delivery thread after what is queued."""
        if self._thread is not None:
            self.drain()
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            self._thread = None


class LogSink:
    """A subscriber that writes one log line per event batch."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger or log
        self.level = level

    def __call__(self, events: Sequence[BlockEvent]) -> None:
        for e in events:
            self.logger.log(self.level, "kvbm %s %s: %d blocks", e.tier, e.kind.value, len(e.hashes))
