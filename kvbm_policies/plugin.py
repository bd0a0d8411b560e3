"""Registers kvbm's eviction policies and admission filters. Imports only kvbm and the stdlib.

LRU and admit-all live in the core (``kvbm.builtin``); this plugin adds the rest. There is
no "presence" filter: the manager already skips every block a tier's registry holds or
is writing, and the shared s3 tier checks its bucket before a PUT.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from kvbm.hookspecs import hookimpl
from kvbm.plugins import CommandRegistry, PolicyRegistry


@hookimpl
def kvbm_register_policies(registry: PolicyRegistry) -> None:
    """Add the eviction policies and admission filters beyond the core's LRU and admit-all."""
    registry.add("lfu", kind="eviction", factory="kvbm_policies.eviction:LFUPolicy",
                 description="least frequently used first, with dynamic aging (LFU-DA)")
    registry.add("priority", kind="eviction", factory="kvbm_policies.eviction:PriorityLRUPolicy",
                 description="lowest priority first, then least recently released (Dynamo)")
    registry.add("arc", kind="eviction", factory="kvbm_policies.eviction:ARCPolicy",
                 description="adaptive replacement cache: recency and frequency lists with ghosts")
    registry.add("s3fifo", kind="eviction", factory="kvbm_policies.eviction:S3FIFOPolicy",
                 description="S3-FIFO: small, main and ghost FIFO queues")
    registry.add("lirs", kind="eviction", factory="kvbm_policies.eviction:LIRSPolicy",
                 description="LIRS: protect blocks with short reuse distance (loops, multi-turn)")
    registry.add("wtinylfu", kind="eviction", factory="kvbm_policies.tinylfu:WTinyLFUPolicy",
                 description="W-TinyLFU: window LRU, frequency-sketch duel into segmented LRU")
    registry.add("prefix", kind="eviction", factory="kvbm_policies.prefix:PrefixLRUPolicy",
                 description="prefix-aware: leaves of the prefix tree first, LRU among them")
    registry.add("adaptive", kind="eviction", factory="kvbm_policies.adaptive:AdaptivePolicy",
                 description="follow the candidate (default lru, lirs) whose shadow hit more")
    registry.add("learned", kind="eviction", factory="kvbm_policies.learned:LearnedPolicy",
                 description="LRU inserting cold the new blocks of a class it learned is rarely reused")
    registry.add("frequency", kind="admission", factory="kvbm_policies.admission:FrequencyFilter",
                 description="admit a block offered often enough (Dynamo's doubling filter)")
    registry.add("priority_prefix", kind="admission",
                 factory="kvbm_policies.admission:PriorityPrefixFilter",
                 description="stop a request's offload at its first block below min_priority")
    registry.add("tinylfu", kind="admission", factory="kvbm_policies.admission:SketchFilter",
                 description="admit a block seen offered twice lately, counted in a 4 MiB sketch")
    registry.add("reuse", kind="admission", factory="kvbm_policies.admission:ReuseWindowFilter",
                 description="admit a block offered again within the last `window` blocks")


@hookimpl
def kvbm_register_commands(registry: CommandRegistry) -> None:
    """Add ``kvbm simulate``; the simulator is imported only when the command runs."""
    registry.add("simulate", factory="kvbm_policies.plugin:simulate_command",
                 description="replay a block trace against each eviction policy beside "
                             "Belady's OPT")


def simulate_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``kvbm simulate``'s factory: add the simulator's arguments, return what runs it."""
    from . import simulate

    simulate.add_arguments(parser)
    return simulate.run
