"""Registers the ``remote`` tier (a peer's host tier over NIXL) and its ``read_only`` filter.

Imports only kvbm and the standard library: nixl and msgpack are imported when a chain
uses the tier. Serving needs no hook: the executor hands the tier the slot map of the
tier it serves (``Tier.serve``), and closing the tier stops serving.
"""

from __future__ import annotations

from kvbm.hookspecs import hookimpl
from kvbm.plugins import PolicyRegistry, TierRegistry

from .config import RemoteTierConfig


@hookimpl
def kvbm_register_tiers(registry: TierRegistry) -> None:
    registry.add(
        "remote",
        factory="kvbm_tiers_remote.tier:RemoteTier",
        config_model=RemoteTierConfig,
        extra="remote",
        requires=("nixl", "msgpack"),
        description="peers' host tiers read over NIXL (UCX); serves this host tier to them",
        # Last in a chain: it takes no offloads, so nothing cascades past it.
        order=4,
    )


@hookimpl
def kvbm_register_policies(registry: PolicyRegistry) -> None:
    registry.add("read_only", kind="admission", factory="kvbm_tiers_remote.admission:AdmitNone",
                 description="admit nothing: a tier filled by peers, never by offload")

