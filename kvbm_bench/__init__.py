"""``kvbm bench``: the main job. A multi-turn workload replayed against a chain.

A plugin (entry point ``bench`` in the group ``kvbm.plugins``) that adds the ``bench``
subcommand to ``kvbm``. Rooms: ``plugin`` (the hook), ``config`` (options and the
embedded default chain), ``cli`` (arguments), ``runner`` (the workload and contiguous
phases), ``workload``, ``limits`` (physical limits measured in the same run) and
``hf`` (``--engine hf``: time to first token of a transformers model).

The names below are imported on first use, so loading the plugin imports no numpy
work, torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BenchOptions": "kvbm_bench.config",
    "BenchReport": "kvbm_bench.runner",
    "run_bench": "kvbm_bench.runner",
    "Turn": "kvbm_bench.workload",
    "multi_turn_workload": "kvbm_bench.workload",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The public names of the bench's modules, imported when first asked for."""
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'kvbm_bench' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), name)
