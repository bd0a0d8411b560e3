"""kvbm's fs tier plugin: one file per block in a directory many instances share.

``plugin`` registers the ``fs`` tier type (light: kvbm and the standard library);
``config`` holds its keys; ``tier`` does the work. Beside it: ``probe`` (what a
directory allows: O_DIRECT or buffered I/O, the filesystem; ``probe_directory`` is
the check a ``kvbm config check --probe`` prints), and the private ``_paths`` (file
names, temporaries, permission and symlink checks) and ``_janitor`` (crashed
writers' temporaries and the directory's byte budget).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .probe import DirectoryProbe, probe_directory

__all__ = ["DirectoryProbe", "probe_directory"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the plugin for `kvbm plugins` runs no probe code.
    if name in __all__:
        from . import probe

        return getattr(probe, name)
    raise AttributeError(f"module 'kvbm_tiers_fs' has no attribute {name!r}")
