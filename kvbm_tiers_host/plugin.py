"""Registers the ``host`` tier. Imports only kvbm and the standard library."""

from __future__ import annotations

from kvbm.hookspecs import hookimpl
from kvbm.plugins import TierRegistry

from .config import HostTierConfig


@hookimpl
def kvbm_register_tiers(registry: TierRegistry) -> None:
    registry.add(
        "host",
        factory="kvbm_tiers_host.tier:HostTier",
        config_model=HostTierConfig,
        description="one arena of N slots in host DRAM, pinned where CUDA is present",
    )
