"""The hooks a kvbm plugin implements. All run at start-up, never per block.

Each ``kvbm_register_*`` hook receives a registry and adds named entries to it; every
implementation is called (none stops the call) and its return value is ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .manager import KvBlockManager
    from .plugins import (
        CommandRegistry,
        ConnectorRegistry,
        LayoutRegistry,
        PolicyRegistry,
        TierRegistry,
    )

PROJECT = "kvbm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvbm_register_tiers(registry: TierRegistry) -> None:
    """Called once when the plugin manager is built, to add tier types.

    ``registry.add(type, config_model=..., factory="pkg.module:Class", extra="pkg")``;
    the factory string is imported only when a chain uses the type. Returns nothing.
    """


@hookspec
def kvbm_register_policies(registry: PolicyRegistry) -> None:
    """Called once when the plugin manager is built, to add eviction policies and
    admission filters: ``registry.add(name, kind="eviction"|"admission", factory=...)``.
    Returns nothing.
    """


@hookspec
def kvbm_register_layouts(registry: LayoutRegistry) -> None:
    """Called once when the plugin manager is built, to add engine-side block layouts
    (classes that copy blocks in and out of an engine's tensors):
    ``registry.add(name, factory="pkg.module:Class")``. Returns nothing.
    """


@hookspec
def kvbm_register_connectors(registry: ConnectorRegistry) -> None:
    """Called once when the plugin manager is built, to add engine connectors:
    ``registry.add(name, factory="pkg.module:Class", extra="vllm")``. Returns nothing.
    """


@hookspec
def kvbm_register_commands(registry: CommandRegistry) -> None:
    """Called once when the plugin manager is built, to add subcommands of ``kvbm``:
    ``registry.add(name, factory="pkg.module:function", description=..., extra=...)``.

    The factory is imported only when ``kvbm NAME`` runs (or its ``--help``): it is
    called with that subcommand's ``argparse.ArgumentParser``, adds its arguments and
    returns the function that runs it (parsed ``Namespace`` → exit code). ``plugins``
    and ``config`` are kvbm's own. Returns nothing.
    """


@hookspec
def kvbm_chain_built(manager: KvBlockManager) -> None:
    """Called once after a manager has built its chain, before it serves a request.

    Plugins subscribe to ``manager.events`` or start exporters here. Returns nothing.
    """


@hookspec
def kvbm_shutdown(manager: KvBlockManager) -> None:
    """Called once when a manager closes, before its tiers are closed. Returns nothing."""
