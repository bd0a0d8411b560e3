"""One pipelined step of the remote tier's reader (``_reader.BlockReader``)."""

from __future__ import annotations

from typing import Any

import numpy as np


class _Step:
    """One pipelined step: a lease, its READ and the blocks it covers."""

    __slots__ = ("idx", "lease", "sums", "handle", "bounce", "ok", "deadline", "off", "length",
                 "addrs", "got", "local", "done_at", "trust")

    def __init__(self) -> None:
        self.idx: list[int] = []
        self.lease = 0
        self.sums: list[int] = []
        self.handle: Any = None
        self.bounce: list[tuple[np.ndarray, np.ndarray]] = []
        self.ok = False
        # Until when the lease surely pins the blocks (this side's monotonic clock);
        # None when the peer did not say its ttl.
        self.deadline: float | None = None
        # A piece of one block (``verify_bytes`` under the block size): its byte range.
        self.off = 0
        self.length = 0  # 0: whole blocks
        self.addrs: list[int] = []  # a speculative READ's remote addresses
        # Each block's xxh3, taken by the lane that READ it right after its READ (for a
        # speculative READ: before the lease reply says what it must be).
        self.got: dict[int, int] = {}
        self.local: list[tuple[int, int, int]] = []  # the local descriptors (see _locals)
        self.done_at = 0.0  # when its READ ended (this side's monotonic clock)
        self.trust = False  # verify: lease, with a ttl: the lease vouches, nothing is hashed
