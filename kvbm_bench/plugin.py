"""Registers the ``kvbm bench`` subcommand. Imports only kvbm and the stdlib."""

from __future__ import annotations

from kvbm.hookspecs import hookimpl
from kvbm.plugins import CommandRegistry


@hookimpl
def kvbm_register_commands(registry: CommandRegistry) -> None:
    """Add ``kvbm bench``; its module is imported only when the command runs."""
    registry.add("bench", factory="kvbm_bench.cli:command",
                 description="replay a multi-turn workload against a chain (the main job)")
