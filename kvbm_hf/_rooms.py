"""What the transformers connector keeps per manager across requests: rooms and offloads.

A *room* is the ``[layers, 2, 1, capacity, kv_heads, head_dim]`` tensor a loaded prefix
is copied into and the model then appends to. Allocating one per request costs a page
fault per 4 KiB on the first copy (a 128 MiB prefix: 32K faults, more than the copy);
the pool keeps rooms, touched once, and hands a free one to the next request.

A CPU room lies on transparent huge pages where the kernel gives them (2 MiB-aligned
private anonymous memory advised ``MADV_HUGEPAGE``, then ``MADV_COLLAPSE`` where the
kernel has it, each refused advice ignored): torch's own allocation sits on 4 KiB
pages, where a load's thousands of 32 KiB runs copied in at about half the speed of
the same runs into huge pages (the host tier's arena and a memcpy limit's numpy
buffers are on huge pages). Without ``mmap`` flags or ``madvise``, ``torch.empty``.

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

import contextlib
import math
import mmap
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

import numpy as np
import torch

from kvbm.engine_blocks import _native
from kvbm.hashing import SequenceHash
from kvbm.manager import KvBlockManager

from . import _table
from ._blocks import RoomViews, room_views

_use_count = getattr(torch._C, "_storage_Use_Count", None)

#: Rooms are this many tokens long at least, and a multiple of it, so prompts of
#: nearby lengths share them.
ROOM_STEP = 2048
#: Free rooms kept per manager (and device); the largest are kept.
MAX_FREE_ROOMS = 2


_HUGE = 2 * 2**20
#: ``madvise`` advice 25 (Linux 6.1+): collapse a range into huge pages now, whatever
#: the THP ``defrag`` setting; older kernels refuse it (EINVAL), which is ignored.
_MADV_COLLAPSE = getattr(mmap, "MADV_COLLAPSE", 25)
#: False: rooms come from ``torch.empty`` (tests compare both).
huge_rooms = True


def host_room(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of ``shape`` on 2 MiB-aligned memory advised for huge pages, every
    page touched; ``torch.empty`` (touched) where the platform has no such mapping."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    mm: mmap.mmap | None = None
    if huge_rooms and nbytes and flags[0] is not None and flags[1] is not None \
            and hasattr(mmap.mmap, "madvise"):
        try:
            mm = mmap.mmap(-1, nbytes + _HUGE, flags=flags[0] | flags[1])
        except (OSError, ValueError):
            mm = None
    if mm is None:
        room = torch.empty(shape, dtype=dtype)
        room.view(-1).view(torch.uint8)[::4096].zero_()  # fault every page in now
        return room
    hugepage = getattr(mmap, "MADV_HUGEPAGE", None)
    # The tensor keeps ``mm`` alive (torch.frombuffer holds the buffer), and unmaps it
    # when the last view of the room is gone.
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    skip = -whole.data_ptr() % _HUGE
    del whole
    if hugepage is not None:
        with contextlib.suppress(OSError):  # a kernel without THP: 4 KiB pages, same bytes
            mm.madvise(hugepage)
    flat = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=skip)
    flat[::4096].zero_()  # fault every page in now (one 2 MiB page a fault, where given)
    with contextlib.suppress(OSError, ValueError):  # already huge, or refused: as it is
        mm.madvise(_MADV_COLLAPSE, skip, nbytes)
    return flat.view(dtype).view(shape)


class _Room:
    """A pooled room and what the pool reads of it, kept as Python values: on the
    request path each torch attribute read costs tens of microseconds cold."""

    __slots__ = ("cap", "cdata", "key", "nbytes", "tensor", "uses", "views")

    def __init__(self, tensor: torch.Tensor, key: tuple[Any, ...]) -> None:
        self.tensor = tensor
        self.key = key
        self.cap = int(tensor.shape[3])
        self.nbytes = tensor.numel() * tensor.element_size()
        #: The layers' views of the room, made once (counted in ``uses`` below: a cache
        #: that uses them holds a view of its own as well, ``KvbmCache``'s room hold).
        self.views = room_views(tensor)
        #: The storage's address (stable for the room's life: the pool's tensor holds
        #: it), and its use count with nothing but the pool holding the room.
        self.cdata = int(tensor.untyped_storage()._cdata)
        self.uses = self.count()

    def count(self) -> int:
        assert _use_count is not None
        return int(_use_count(self.cdata))

    def free(self) -> bool:
        """No cache, view or offload holds the room: the pool may hand it out."""
        return self.count() == self.uses


class ConnectorState:
    """Rooms and in-flight offloads of one manager."""

    def __init__(self, manager: KvBlockManager) -> None:
        self._manager = weakref.ref(manager)
        self._lock = threading.Lock()
        self._rooms: list[_Room] = []
        self._pending: dict[SequenceHash, object] = {}
        # Offloads (by key) whose hashes are not listed yet: a latch (a lock, held)
        # released once they are (or the offload is done), and their tokens up to the
        # first block they store …
        self._unlisted: dict[object, tuple[threading.Lock, np.ndarray]] = {}
        # … and the hashes each listed one stores.
        self._listed: dict[object, list[SequenceHash]] = {}
        # … and the job (its future) running each, once submitted.
        self._jobs: dict[object, Future[Any]] = {}
        self.allocated = 0  # rooms made, for tests and stats
        _native.copy_runs()  # compile the copy loop now, not inside the first request
        _table.load()  # and the load's table (~0.1 s to compile)

    # -- rooms ---------------------------------------------------------------------------
    def room(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
             tokens: int) -> tuple[torch.Tensor, RoomViews | None, object]:
        """A free room of at least ``tokens`` tokens (dim 3), its other dims ``shape``'s;
        its layers' views (``room_views``; None where the pool keeps no rooms); and a
        hold on it, which the caller keeps while it uses the room.

        The room and its views are the pool's, shared by every request the room
        serves: the hold (an alias of the room, never used but to hold it) is what
        marks it busy (it adds one to the storage's use count; a Python storage object
        would not: torch keeps that one alive from the storage, not the other way round).
        """
        key = (device, dtype, shape[:3], shape[4:])
        with self._lock:
            best: _Room | None = None
            for r in self._rooms:
                if (r.key == key and r.cap >= tokens and (best is None or r.cap < best.cap)
                        and r.free()):
                    best = r
            # The hold, taken under the lock: it counts from here on, so no other
            # request can take the same room before the caller's cache holds it.
            if best is not None:
                return best.tensor, best.views, best.tensor.detach()
            cap = -(-tokens // ROOM_STEP) * ROOM_STEP
            full = (*shape[:3], cap, *shape[4:])
            with torch.inference_mode(False):  # a normal tensor, whatever the caller's mode
                # Every page faulted in now, once for the room's whole life.
                room = (host_room(full, dtype) if device.type == "cpu"
                        else torch.empty(full, dtype=dtype, device=device))
                self.allocated += 1
                if _use_count is None:
                    return room, None, room
                made = _Room(room, key)
            self._rooms.append(made)
            hold = room.detach()
            self._trim()
            return room, made.views, hold

    def _trim(self) -> None:
        free = [r for r in self._rooms if r.free()]
        if len(free) <= MAX_FREE_ROOMS:
            return
        free.sort(key=lambda r: r.nbytes)
        drop = {id(r) for r in free[: len(free) - MAX_FREE_ROOMS]}
        self._rooms = [r for r in self._rooms if id(r) not in drop]

    # -- offloads ------------------------------------------------------------------------
    def started(self, key: object, tokens: np.ndarray, first: int, page: int) -> None:
        """Track an offload of blocks ``first``.. of ``tokens`` (``key``: any object of
        its own) until ``listed`` lists its hashes or ``finished`` ends it.

        Its block hashes are computed in the background; until they are listed, a
        request whose tokens agree with ``tokens`` up to block ``first`` (the only
        requests that can share a block with it) waits. The latch is a lock taken here
        and released once (one C object: an ``Event`` builds a ``Condition`` in Python,
        which on the request path, right after a forward, cost ~0.1 ms more).
        """
        latch = threading.Lock()
        latch.acquire()
        upto = (first + 1) * page
        with self._lock:
            self._unlisted[key] = (latch, tokens[:upto])

    def run_job(self, key: object, submit: Callable[[], Future[Any]]) -> Future[Any]:
        """``submit()`` (the job storing ``key``'s offload), registered as it under this
        state's lock, so its ``listed`` waits until it is; ``finished`` once it is done."""
        with self._lock:
            fut = submit()
            self._jobs[key] = fut
        fut.add_done_callback(lambda _: self.finished(key))
        return fut

    def finished(self, key: object) -> None:
        """``key``'s offload is over: nothing of it is waited for any more."""
        with self._lock:
            entry = self._unlisted.pop(key, None)
            self._jobs.pop(key, None)
            for h in self._listed.pop(key, ()):
                if self._pending.get(h) is key:
                    del self._pending[h]
        if entry is not None:
            entry[0].release()

    def listed(self, key: object, hashes: list[SequenceHash]) -> None:
        """List ``hashes`` as being stored by ``key``'s offload (a no-op once it finished)."""
        with self._lock:
            entry = self._unlisted.pop(key, None)
            if entry is None:  # finished already: nothing is being stored
                return
            self._listed[key] = hashes
            for h in hashes:
                self._pending[h] = key
        entry[0].release()

    def await_stores(self, tokens: np.ndarray, hashes: list[SequenceHash],
                     timeout: float | None = 60.0) -> None:
        """Wait for offloads still storing any of ``hashes``, the blocks of ``tokens`` (a
        prefix about to be matched)."""
        if not self._unlisted and not self._pending:
            # Nothing is being stored (read without the lock: an offload started after
            # this read is one this request did not wait for either way).
            return
        with self._lock:
            unlisted = list(self._unlisted.values())
        for latch, head in unlisted:
            # Hashes chain from the first token: only a prompt that starts with an
            # offload's tokens up to its first stored block can share a block with it.
            if len(tokens) >= len(head) and np.array_equal(tokens[: len(head)], head) \
                    and latch.acquire(timeout=-1 if timeout is None else timeout):
                latch.release()  # open for the other waiters
        with self._lock:
            keys = {id(k): k for h in hashes if (k := self._pending.get(h)) is not None}
            futs = [f for k in keys.values() if (f := self._jobs.get(k)) is not None]
        if futs:
            wait(futs, timeout=timeout)


_states: weakref.WeakKeyDictionary[KvBlockManager, ConnectorState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def state_of(manager: KvBlockManager) -> ConnectorState:
    """The connector's state for ``manager``, made on first use."""
    with _states_lock:
        st = _states.get(manager)
        if st is None:
            st = _states[manager] = ConnectorState(manager)
        return st
