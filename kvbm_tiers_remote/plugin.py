"""Registers the ``remote`` tier (a peer's host tier over NIXL) and starts serving.

Imports only kvbm and the standard library: nixl and msgpack are imported when a chain
uses the tier. ``kvbm_chain_built`` hands each remote tier its manager, so the tier can
expose the manager's host tier to peers; ``kvbm_shutdown`` stops that before the
tiers close. The manager reference lives on the tier instance (one per manager).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbm.hookspecs import hookimpl
from kvbm.plugins import PolicyRegistry, TierRegistry

from .config import RemoteTierConfig

if TYPE_CHECKING:
    from kvbm.manager import KvBlockManager


@hookimpl
def kvbm_register_tiers(registry: TierRegistry) -> None:
    registry.add(
        "remote",
        factory="kvbm_tiers_remote.tier:RemoteTier",
        config_model=RemoteTierConfig,
        extra="remote",
        requires=("nixl", "msgpack"),
        description="peers' host tiers read over NIXL (UCX); serves this host tier to them",
    )


@hookimpl
def kvbm_register_policies(registry: PolicyRegistry) -> None:
    registry.add("read_only", kind="admission", factory="kvbm_tiers_remote.admission:AdmitNone",
                 description="admit nothing: a tier filled by peers, never by offload")


def _remote_tiers(manager: KvBlockManager) -> list[object]:
    return [rt.tier for rt in manager.chain if rt.config.type == "remote"]


@hookimpl
def kvbm_chain_built(manager: KvBlockManager) -> None:
    for tier in _remote_tiers(manager):
        attach = getattr(tier, "attach", None)
        if attach is not None:
            attach(manager)


@hookimpl
def kvbm_shutdown(manager: KvBlockManager) -> None:
    for tier in _remote_tiers(manager):
        detach = getattr(tier, "detach", None)
        if detach is not None:
            detach()
