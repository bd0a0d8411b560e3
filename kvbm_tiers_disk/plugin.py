"""Registers the ``disk`` tier. Imports only kvbm and the standard library."""

from __future__ import annotations

from kvbm.hookspecs import hookimpl
from kvbm.plugins import TierRegistry

from .config import DiskTierConfig


@hookimpl
def kvbm_register_tiers(registry: TierRegistry) -> None:
    registry.add(
        "disk",
        factory="kvbm_tiers_disk.tier:DiskTier",
        config_model=DiskTierConfig,
        extra="disk",
        description="preallocated files of aligned slots, O_DIRECT; survives a restart",
    )
