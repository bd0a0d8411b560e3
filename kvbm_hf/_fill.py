"""A loaded prefix's layers copied in while the model computes the earlier ones.

The rest of the prompt's forward needs layer ``L``'s KV only when it reaches layer
``L``'s attention. So a load copies its first layer(s) on the request thread, hands the
other layers' copies to one of the manager's I/O threads in layer order, and returns:
the model computes layer 0 while layer 1 is copied, and so on. ``KvbmLayer`` waits for
its layer's copy before anything reads its keys or values (``LayerFill.wait``).

What a fill holds until its last layer landed: the room (an alias, so the pool does
not hand it to another request meanwhile) and the match's pins (the tier's rows it
reads from stay where they are); the pins are given back on the I/O thread after the
last layer, before that layer is marked done, so whoever saw every layer done also
sees the pins back. A CPU room only: a CUDA room is loaded whole before ``load_prefix``
returns (torch's copies there are queued on the device in order anyway).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kvbm.engine_blocks import _native

#: Layers copied on the request thread before ``load_prefix`` returns (at least one: the
#: model reaches layer 0's attention within a millisecond of starting).
SYNC_LAYERS = 1


class LayerFill:
    """Layers ``first..`` of a load, copied in order on another thread.

    ``jobs[i]`` is ``(dst, src)``: int64 address tables of layer ``first + i``'s runs of
    ``part`` bytes each. ``run`` copies them (shared with the copy threads of ``share``,
    the executor's, when given), marking each layer done; ``wait(layer)`` blocks until
    that layer is. ``done_at``: ``time.perf_counter()`` when the fill was over (pins back);
    ``copied_at``: when its bytes were (before the pins went back); ``waited``: seconds
    callers spent in ``wait``.
    """

    def __init__(self, first: int, num_layers: int, runs: _native.RunCopy, part: int,
                 jobs: list[tuple[np.ndarray, np.ndarray]],
                 share: tuple[ThreadPoolExecutor, int] | None) -> None:
        self.first = first
        self.num_layers = num_layers
        self._events = [threading.Event() for _ in range(first, num_layers)]
        self._runs = runs
        self._part = part
        self._jobs = jobs
        self._share = share
        self._then: list[Callable[[], None]] = []
        self._hold: list[Any] = []
        self.error: BaseException | None = None
        self.done_at = 0.0
        #: ``time.perf_counter()`` when the last layer's bytes were copied (before the pins).
        self.copied_at = 0.0
        self.waited = 0.0
        #: Layers in place so far (the first ``first`` were copied before the fill).
        self.landed = first
        self._started = False
        self._lock = threading.Lock()

    def then(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after the last layer's copy (before it is marked done)."""
        self._then.append(fn)

    def hold(self, obj: Any) -> None:
        """Keep ``obj`` alive until the fill is over (the room's alias)."""
        self._hold.append(obj)

    def run(self) -> None:
        """Copy every pending layer in order (once; a second call returns at once)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        try:
            ctx = _native.share(*self._share) if self._share is not None else None
            if ctx is not None:
                ctx.__enter__()
            try:
                for i, (d, s) in enumerate(self._jobs):
                    _native.run_copy(self._runs, len(d), d, s, self._part)
                    self.landed = self.first + i + 1
                    if i + 1 < len(self._events):
                        self._events[i].set()
                self.copied_at = time.perf_counter()
            finally:
                if ctx is not None:
                    ctx.__exit__(None, None, None)
        except BaseException as e:
            self.error = e
            raise
        finally:
            self._jobs = []
            try:
                for fn in self._then:
                    fn()
            finally:
                self._then = []
                self._hold.clear()
                self.done_at = time.perf_counter()
                for ev in self._events:
                    ev.set()

    def wait(self, layer: int) -> None:
        """Return once layer ``layer`` is in place; raise if its copy failed."""
        k = layer - self.first
        if 0 <= k < len(self._events):
            ev = self._events[k]
            if not ev.is_set():
                t0 = time.perf_counter()
                ev.wait()
                self.waited += time.perf_counter() - t0
        if self.error is not None and layer >= self.landed:
            raise RuntimeError(
                f"kvbm: copying layer {layer} of the loaded prefix failed ({self.error!r}); "
                "its KV is not in place, so this cache cannot be used (run the request again)"
            ) from self.error

    @property
    def started(self) -> bool:
        """``run`` was called (it may still be copying)."""
        return self._started

    def join(self) -> None:
        """Return once the fill is over, its copies failed or not (nothing raised)."""
        if self._events:
            self._events[-1].wait()

    def wait_all(self) -> None:
        """Return once every layer is in place (and the pins are back)."""
        self.wait(self.num_layers - 1)

    @property
    def done(self) -> bool:
        """Every layer is in place."""
        return not self._events or self._events[-1].is_set()
