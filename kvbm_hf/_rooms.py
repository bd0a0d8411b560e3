"""What the transformers connector keeps per manager across requests: rooms and offloads.

A *room* is the ``[layers, 2, 1, capacity, kv_heads, head_dim]`` tensor a loaded prefix
is copied into and the model then appends to. Allocating one per request costs a page
fault per 4 KiB on the first copy (a 128 MiB prefix: 32K faults, more than the copy);
the pool keeps rooms, touched once, and hands a free one to the next request.

A room is free when nothing but the pool holds its memory: no cache's layers, no view
a caller kept, no background offload reading it (its source holds views). That is
read from the storage's use count, so a room is never handed out while anything can
still read or write it, whoever forgot to release it. Where torch offers no use count,
nothing is reused (a new room every time, as before).

Offloads run on the manager's I/O threads (``manager.flush()`` and ``close()`` wait for
them). Their block hashes stay listed until they finish: a request whose prompt
starts with a block still being stored waits for that store before it matches, so
back-to-back requests sharing a prefix load it instead of computing it again.
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, wait
from typing import Any

import torch

from kvbm.engine_blocks import _native
from kvbm.hashing import SequenceHash
from kvbm.manager import KvBlockManager

_use_count = getattr(torch._C, "_storage_Use_Count", None)

#: Rooms are this many tokens long at least, and a multiple of it, so prompts of
#: nearby lengths share them.
ROOM_STEP = 2048
#: Free rooms kept per manager (and device); the largest are kept.
MAX_FREE_ROOMS = 2


def _uses(room: torch.Tensor) -> int:
    assert _use_count is not None
    return int(_use_count(room.untyped_storage()._cdata))


def _free(room: torch.Tensor) -> bool:
    if _use_count is None:
        return False
    # As many references as when the pool made it (its own tensor, and the storage
    # object this call makes): no cache, view or offload holds it.
    return _uses(room) == getattr(room, "_kvbm_uses", -1)


class ConnectorState:
    """Rooms and in-flight offloads of one manager."""

    def __init__(self, manager: KvBlockManager) -> None:
        self._manager = weakref.ref(manager)
        self._lock = threading.Lock()
        self._rooms: list[torch.Tensor] = []
        self._pending: dict[SequenceHash, Future[Any]] = {}
        self.allocated = 0  # rooms made, for tests and stats
        _native.copy_runs()  # compile the copy loop now, not inside the first request

    # -- rooms ---------------------------------------------------------------------------
    def room(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
             tokens: int) -> torch.Tensor:
        """A free room of at least ``tokens`` tokens (dim 3), its other dims ``shape``'s."""
        with self._lock:
            best: torch.Tensor | None = None
            for r in self._rooms:
                if (r.device == device and r.dtype == dtype and r.shape[3] >= tokens
                        and r.shape[:3] == shape[:3] and r.shape[4:] == shape[4:] and _free(r)
                        and (best is None or r.shape[3] < best.shape[3])):
                    best = r
            # A view, made under the lock: the caller's hold counts from here on, so no
            # other request can take the same room before the caller's cache holds it.
            with torch.inference_mode(False):
                if best is not None:
                    return best.view(best.shape)
                cap = -(-tokens // ROOM_STEP) * ROOM_STEP
                room = torch.empty((*shape[:3], cap, *shape[4:]), dtype=dtype, device=device)
                if device.type == "cpu":
                    # Fault every page in now, once for the room's whole life.
                    room.view(-1).view(torch.uint8)[::4096].zero_()
                self.allocated += 1
                if _use_count is None:
                    return room
                room._kvbm_uses = _uses(room)  # type: ignore[attr-defined]
                self._rooms.append(room)
                mine = room.view(room.shape)
                self._trim()
                return mine

    def _trim(self) -> None:
        free = [r for r in self._rooms if _free(r)]
        if len(free) <= MAX_FREE_ROOMS:
            return
        free.sort(key=lambda r: r.numel())
        drop = {id(r) for r in free[: len(free) - MAX_FREE_ROOMS]}
        self._rooms = [r for r in self._rooms if id(r) not in drop]

    # -- offloads ------------------------------------------------------------------------
    def started(self, hashes: list[SequenceHash], fut: Future[Any]) -> None:
        """List ``hashes`` as being stored until ``fut`` finishes."""
        with self._lock:
            for h in hashes:
                self._pending[h] = fut

        def done(_: Future[Any]) -> None:
            with self._lock:
                for h in hashes:
                    if self._pending.get(h) is fut:
                        del self._pending[h]

        fut.add_done_callback(done)

    def await_stores(self, hashes: list[SequenceHash], timeout: float | None = 60.0) -> None:
        """Wait for offloads still storing any of ``hashes`` (a prefix about to be matched)."""
        with self._lock:
            futs = {id(f): f for h in hashes if (f := self._pending.get(h)) is not None}
        if futs:
            wait(list(futs.values()), timeout=timeout)


_states: weakref.WeakKeyDictionary[KvBlockManager, ConnectorState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def state_of(manager: KvBlockManager) -> ConnectorState:
    """The connector's state for ``manager``, made on first use."""
    with _states_lock:
        st = _states.get(manager)
        if st is None:
            st = _states[manager] = ConnectorState(manager)
        return st
