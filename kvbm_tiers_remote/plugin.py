"""Registers the ``remote`` tier (a peer's host tier over NIXL) and starts serving.

Imports only kvbm and the standard library: nixl and msgpack are imported when a chain
uses the tier. ``kvbm_chain_built`` hands each remote tier its manager, so the tier can
expose the manager's host tier to peers; ``kvbm_shutdown`` stops that before the
tiers close. The manager reference lives on the tier instance (one per manager).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvbm.errors import ConfigError
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
        # Last in a chain: it takes no offloads, so nothing cascades past it.
        order=4,
    )


@hookimpl
def kvbm_register_policies(registry: PolicyRegistry) -> None:
    registry.add("read_only", kind="admission", factory="kvbm_tiers_remote.admission:AdmitNone",
                 description="admit nothing: a tier filled by peers, never by offload")


def _remote_tiers(manager: KvBlockManager) -> list[object]:
    return [rt.tier for rt in manager.chain if rt.config.type == "remote"]


log = logging.getLogger("kvbm.remote")


def check_place(manager: KvBlockManager) -> None:
    """Refuse a write-through chain with tiers below a remote tier; warn without one.

    A remote tier takes no offloads (``read_only``), and the cascade copies tier *i*
    to tier *i+1* only: every tier below a remote tier would never receive a block
    from this instance (and each re-offload would be pinned and offered again, in
    vain). That is a chain that silently does not do what it says, so it is refused.
    Without write-through nothing cascades anyway; only the lookup order changes
    (the network before local tiers), which is worth a warning.
    """
    chain = manager.chain
    for i, rt in enumerate(chain[:-1]):
        if rt.config.type != "remote":
            continue
        below = ", ".join(repr(r.name) for r in chain[i + 1 :])
        if manager.settings.write_through:
            raise ConfigError(
                f"tier {rt.name!r}: a remote tier takes no offloads, so the write-through "
                f"cascade stops at it and tier(s) {below} below it would never receive a "
                f"block; move {rt.name!r} to the end of 'tiers'"
            )
        log.warning(
            "kvbm tier %r: a remote tier is looked up before tier(s) %s below it, which are "
            "local; move %r to the end of 'tiers'", rt.name, below, rt.name,
        )


@hookimpl
def kvbm_chain_built(manager: KvBlockManager) -> None:
    check_place(manager)
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
