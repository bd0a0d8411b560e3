"""What the transfers need from the device API: torch, streams, events, pinned staging.

One module hides the difference between a CUDA device and CPU tensors, so every
transfer path runs on both: on CPU a "stream" is the calling thread, an event is
already complete when recorded, and "pinned" staging is page-aligned memory.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from kvbm.engine_blocks import import_torch, resolve_device
from kvbm.layout import aligned_empty

# Shared with the core adapter, which needs them without this plugin.
__all__ = ["StagingBuffer", "StagingPair", "Stream", "import_torch", "resolve_device"]


class Stream:
    """A CUDA stream for one copy direction, or the calling thread on CPU."""

    def __init__(self, device: Any) -> None:
        torch = import_torch()
        self.device = device
        self.cuda = device.type == "cuda"
        self._torch = torch
        # A stream of its own per direction lets offload and onboard copies overlap each
        # other and the engine's compute, which runs on the current stream.
        self.raw = torch.cuda.Stream(device) if self.cuda else None

    def context(self) -> Any:
        """``with stream.context():`` issues torch work on this stream."""
        if self.raw is None:
            import contextlib

            return contextlib.nullcontext()
        return self._torch.cuda.stream(self.raw)

    def after_compute(self) -> None:
        """Order this stream after the work queued so far on the current (compute) stream."""
        if self.raw is not None:
            self.raw.wait_stream(self._torch.cuda.current_stream(self.device))

    def event(self) -> Any:
        """A new event to record on this stream, or None on CPU."""
        return self._torch.cuda.Event() if self.cuda else None

    def record(self, event: Any) -> None:
        if event is not None:
            event.record(self.raw)

    def synchronize(self) -> None:
        if self.raw is not None:
            self.raw.synchronize()


class StagingBuffer:
    """One contiguous host buffer (pinned on CUDA) and its device twin.

    ``host`` is a ``uint8`` tensor, ``host_np`` the numpy view of the same bytes. On
    CPU the device twin is the host buffer itself: a gather lands in it directly.
    ``ready`` is the event after which the host bytes may be overwritten again.
    """

    def __init__(self, nbytes: int, device: Any) -> None:
        torch = import_torch()
        self.nbytes = nbytes
        if device.type == "cuda":
            self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.host_np: np.ndarray = self.host.numpy()
            self.dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        else:
            self.host_np = aligned_empty(nbytes)
            self.host = torch.from_numpy(self.host_np)
            self.dev = self.host
        self.ready: Any = None

    def wait_ready(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None


class StagingPair:
    """Two staging buffers used in turn, so one fills while the other is copied.

    Guarded by a lock: one transfer per direction at a time uses them.
    """

    def __init__(self, device: Any, nbytes: int) -> None:
        self.device = device
        self.nbytes = nbytes
        self.lock = threading.Lock()
        self._bufs: list[StagingBuffer] = []

    def buffers(self, need: int) -> list[StagingBuffer]:
        """The two buffers, (re)allocated to hold at least ``need`` bytes each."""
        size = max(need, self.nbytes)
        if not self._bufs or self._bufs[0].nbytes < need:
            for b in self._bufs:
                b.wait_ready()
            self._bufs = [StagingBuffer(size, self.device), StagingBuffer(size, self.device)]
        return self._bufs

    @property
    def allocated(self) -> int:
        return sum(b.nbytes for b in self._bufs)
