"""Registers the ``disk`` tier. Imports only kvbm and the standard library."""

from __future__ import annotations

from kvbm.config import EnvAlias, decimal_gigabytes, truthy
from kvbm.hookspecs import hookimpl
from kvbm.plugins import TierRegistry

from .config import DiskTierConfig


@hookimpl
def kvbm_register_tiers(registry: TierRegistry) -> None:
    """Add the ``disk`` tier type and its Dynamo variables."""
    registry.add(
        "disk",
        factory="kvbm_tiers_disk.tier:DiskTier",
        config_model=DiskTierConfig,
        extra="disk",
        description="preallocated files of aligned slots, O_DIRECT; survives a restart",
        order=2,
        env={
            # Dynamo KVBM's variables; any of the first six alone adds a disk tier. A
            # size without a CPU one is Dynamo's disk-only chain: the device offloads
            # straight to disk, every block (the frequency filter guards host-to-disk).
            "DYN_KVBM_DISK_CACHE_GB": EnvAlias("capacity", decimal_gigabytes, names_chain=True,
                                               alone={"admission": "all"}),
            "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": EnvAlias(
                "num_blocks", int, names_chain=True, alone={"admission": "all"}),
            "DYN_KVBM_DISK_CACHE_DIR": EnvAlias("path"),
            "DYN_KVBM_DISK_ZEROFILL_FALLBACK": EnvAlias("zerofill_fallback"),
            "DYN_KVBM_DISK_DISABLE_O_DIRECT": EnvAlias("disable_o_direct"),
            "DYN_KVBM_DISK_ALLOCATOR_TYPE": EnvAlias("allocator_type"),
            # Dynamo's switch for its frequency filter (the disk tier's default admission).
            "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": EnvAlias(
                "admission", convert=lambda _: "all", when=truthy,
                adds_tier=False, every_tier=True),
        },
    )
