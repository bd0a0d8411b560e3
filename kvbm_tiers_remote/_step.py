"""One pipelined step of the remote tier's reader (``_reader.BlockReader``)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np


class _Step:
    """One pipelined step: a lease, its READ and the blocks it covers."""

    __slots__ = ("idx", "lease", "sums", "handle", "bounce", "ok", "deadline", "off", "length",
                 "addrs", "got", "digests")

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
        # A speculative READ's xxh3 per block, taken as each part arrived (before the
        # lease reply says what they must be), and the hashing still running.
        self.got: dict[int, int] = {}
        self.digests: list[Future[None]] = []
