"""A policy that passes every call on to another: the base for wrappers that observe one.

Tests record the calls a replay makes, benches count hits by kind, a third party logs
victims: each overrides only the calls it watches and leaves the rest to this class.
Optional hooks an inner policy may offer (``prepare_keys``, ``prefetch_slots``) are not
passed on unless a subclass exposes them, so a wrapper never changes which path a
caller takes by accident.
"""

from __future__ import annotations

from typing import Any

from kvbm.policy import EvictionPolicy

__all__ = ["ForwardingPolicy"]


class ForwardingPolicy(EvictionPolicy):
    """Every call of the contract goes to ``inner``; same capacity, same victims."""

    def __init__(self, inner: EvictionPolicy) -> None:
        super().__init__(inner.capacity)
        self.inner = inner

    def insert(self, key: Any, priority: int = 0) -> None:
        self.inner.insert(key, priority)

    def touch(self, key: Any) -> None:
        self.inner.touch(key)

    def pin(self, key: Any) -> None:
        self.inner.pin(key)

    def unpin(self, key: Any) -> None:
        self.inner.unpin(key)

    def remove(self, key: Any) -> None:
        self.inner.remove(key)

    def victim(self) -> Any:
        return self.inner.victim()

    def __len__(self) -> int:
        return len(self.inner)
