"""A match: a pinned prefix of a request's blocks, bound to the planner that made it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import KvbmError
from .hashing import SequenceHash

if TYPE_CHECKING:
    from .planner import Planner

Pin = tuple[int, int]  # (tier index, slot)


class Match:
    """A pinned prefix of a request's blocks; ``release()`` it (or use ``with``) when done.

    ``tiers[i]`` names the tier that holds ``hashes[i]``. Pinned blocks cannot be
    evicted until released. A match belongs to the planner (manager, chain) that made
    it: another one refuses it. A match dropped without ``release()`` gives its pins
    back when it is garbage-collected, and the planner counts them as leaked.
    """

    def __init__(self, planner: Planner, page_size: int, *, owner: Match | None = None) -> None:
        self.hashes: list[SequenceHash] = []
        self.tiers: list[str] = []
        self.page_size = page_size
        self._pins: list[Pin] = []
        self._planner: Planner | None = planner
        # A part of another match holds no pins of its own (its owner releases them).
        self._owner = owner

    def __del__(self) -> None:
        # Dropped without release(): the planner takes the pins back at its next call
        # (``_leak`` only queues them). ``__del__`` rather than ``weakref.finalize``: a
        # finalizer's registration cost ~1 us of every match (a quarter of its Python).
        planner = self._planner
        if planner is not None and self._owner is None:
            planner._leak(self._pins)

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)

    @property
    def num_tokens(self) -> int:
        return len(self.hashes) * self.page_size

    @property
    def released(self) -> bool:
        return self._planner is None

    def part(self, start: int, n: int) -> Match:
        """Blocks ``start`` to ``start + n`` as a match of their own, to onboard in pieces.

        The pins stay with this match: releasing the part releases nothing, and the
        part is refused once this match is released.
        """
        if self._planner is None:
            raise KvbmError("this Match was released; match the prefix again")
        p = Match(self._planner, self.page_size, owner=self)
        p.hashes = self.hashes[start:start + n]
        p.tiers = self.tiers[start:start + n]
        p._pins = self._pins[start:start + n]
        return p

    def release(self) -> None:
        """Drop the pins; idempotent."""
        planner, self._planner = self._planner, None
        if planner is not None and self._owner is None:
            planner.release(self)

    def __enter__(self) -> Match:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._planner is None else "pinned"
        return f"Match(num_blocks={self.num_blocks}, tiers={self.tiers!r}, {state})"
