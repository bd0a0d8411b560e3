"""The ``read_only`` admission filter: a tier that takes no offloads (the remote tier)."""

from __future__ import annotations

from collections.abc import Sequence

from kvbm.hashing import SequenceHash
from kvbm.policy import AdmissionPolicy


class AdmitNone(AdmissionPolicy):
    """Reject every block: the tier is filled by others (a peer's host tier), never by offload."""

    def admit(
        self, keys: Sequence[SequenceHash], priorities: Sequence[int] | None = None
    ) -> list[bool]:
        return [False] * len(keys)
