"""Which packs this instance wrote, and which of their blocks its registry may hold.

With ``delete_on_evict`` a pack object may be deleted only when none of its blocks
is still held: evicting one block must never make a sibling unreadable. The tier
hears of a block being held when it writes it, reads it, or a probe finds it (the
manager may adopt what a probe finds), and of it no longer being held when the
registry discards it. The existence cache cannot answer this: it forgets, and it
describes the bucket, not the registry.

The book is bounded: at most ``limit`` packs (the tier's slot count; each held block
keeps at most one pack alive). When it is full the pack touched least recently is
forgotten, and a forgotten pack is never deleted by this instance: its objects stay
for the bucket's lifecycle rules, which is always safe. A block a probe found but
the manager never adopted keeps its pack alive the same way, until forgotten.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvbm.hashing import SequenceHash


@dataclass(slots=True)
class _Pack:
    """One pack object this instance wrote."""

    members: tuple[SequenceHash, ...]
    #: Pointer objects this instance created for it (a name another object already
    #: held is not ours to delete).
    pointers: set[str]
    #: Members the registry may hold, with the slots it holds them in (None: adopted
    #: after a probe, slot not yet seen). A late discard of an old slot then leaves
    #: a block that was saved or adopted again in another slot held.
    held: dict[SequenceHash, list[int | None]] = field(default_factory=dict)


class PackBook:
    """The packs this instance wrote and may delete; thread-safe."""

    def __init__(self, limit: int, name_of: Callable[[SequenceHash], str]) -> None:
        self.limit = max(1, limit)
        self._name_of = name_of
        self._packs: OrderedDict[str, _Pack] = OrderedDict()
        self._pack_of: dict[SequenceHash, str] = {}
        self._lock = threading.Lock()
        #: Packs forgotten because the book was full (left to lifecycle rules).
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._packs)

    def claim(self, key: SequenceHash) -> None:
        """This instance just stored a new object under ``key``'s name: a pack or
        pointer of the book that had that name is gone, so never delete it as one."""
        name = self._name_of(key)
        with self._lock:
            if name in self._packs:
                self._forget(name)
            owner = self._pack_of.get(key)
            if owner is not None:
                self._packs[owner].pointers.discard(name)

    def wrote(self, name: str, members: Sequence[SequenceHash], pointers: Sequence[str]) -> list[str]:
        """Pack ``name`` holding ``members`` was stored, with the pointer objects
        ``pointers``. Returns older packs of this book to delete now: their only held
        blocks were written again into this one."""
        doomed: list[str] = []
        with self._lock:
            if name in self._packs:
                self._forget(name)
            for k in members:
                old = self._pack_of.get(k)
                if old is None:
                    continue
                p = self._packs[old]
                if p.held.pop(k, None) is not None and not p.held:
                    doomed += self._retire(old)
                else:
                    del self._pack_of[k]  # k is read from the new pack now
            self._packs[name] = _Pack(tuple(members), set(pointers))
            for k in members:
                self._pack_of[k] = name
            while len(self._packs) > self.limit:
                self._forget(next(iter(self._packs)))
                self.forgotten += 1
        return doomed

    def hold(self, key: SequenceHash, slot: int | None) -> None:
        """The registry may hold ``key`` in ``slot`` (None: a probe found it)."""
        with self._lock:
            name = self._pack_of.get(key)
            if name is None:
                return
            p = self._packs[name]
            self._packs.move_to_end(name)
            slots = p.held.setdefault(key, [])
            if slot in slots:
                return
            if slot is not None and None in slots:
                slots.remove(None)  # the adopted block's slot, now seen
            slots.append(slot)

    def release(self, key: SequenceHash, slot: int) -> list[str] | None:
        """The registry dropped ``key`` from ``slot``. None if ``key`` is in no pack of
        the book; else the objects to delete now: the pack and its pointers once none
        of its blocks is held, nothing before."""
        with self._lock:
            name = self._pack_of.get(key)
            if name is None:
                return None
            p = self._packs[name]
            slots = p.held.get(key)
            if not slots:
                return []
            if slot in slots:
                slots.remove(slot)
            elif None in slots:
                slots.remove(None)
            else:
                return []  # a late discard of a slot the block has left: still held
            if slots:
                return []
            del p.held[key]
            return [] if p.held else self._retire(name)

    def _retire(self, name: str) -> list[str]:
        """Forget pack ``name`` and return its objects (lock held)."""
        pointers = self._packs[name].pointers
        self._forget(name)
        return [name, *sorted(pointers)]

    def _forget(self, name: str) -> None:
        """Drop pack ``name`` from the book without deleting it (lock held)."""
        p = self._packs.pop(name)
        for k in p.members:
            if self._pack_of.get(k) == name:
                del self._pack_of[k]
