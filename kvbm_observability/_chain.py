"""What the observability plugin reads of a manager's chain: each tier's declared medium."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbm.tier import Tier

if TYPE_CHECKING:
    from kvbm.manager import KvBlockManager


def tier_media(manager: KvBlockManager) -> dict[str, str]:
    """Tier name → the medium its class declares (``kvbm.tier.MEDIA``), in chain order.

    Events and metrics name where blocks live from this, never from the tier's type
    name, so a third party's tier reports as what it declares.
    """
    return {rt.name: str(getattr(type(rt.tier), "medium", Tier.medium)) for rt in manager.chain}
