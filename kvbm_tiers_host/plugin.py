"""Registers the ``host`` tier. Imports only kvbm and the standard library."""

from __future__ import annotations

from kvbm.config import EnvAlias, decimal_gigabytes
from kvbm.hookspecs import hookimpl
from kvbm.plugins import TierRegistry

from .config import HostTierConfig


@hookimpl
def kvbm_register_tiers(registry: TierRegistry) -> None:
    """Add the ``host`` tier type, its Dynamo variables and the default chain."""
    registry.add(
        "host",
        factory="kvbm_tiers_host.tier:HostTier",
        config_model=HostTierConfig,
        description="one arena of N slots in host DRAM, pinned where CUDA is present",
        order=1,
        # The chain a config that names none runs: one host tier.
        default={"capacity": "4GiB"},
        env={
            # Dynamo KVBM's variables; "GB" is 10**9 bytes. Sizes name the chain.
            "DYN_KVBM_CPU_CACHE_GB": EnvAlias("capacity", decimal_gigabytes, names_chain=True),
            "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": EnvAlias("num_blocks", int,
                                                               names_chain=True),
            "DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY": EnvAlias(
                "admission_options.min_priority", also={"admission": "priority_prefix"},
                adds_tier=False, every_tier=True),
        },
    )
