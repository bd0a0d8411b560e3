"""Install real distributions (a package plus its .dist-info) for plugin tests."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def make_distribution(root: Path, dist: str, pkg: str, ep_name: str, body: str) -> None:
    """Write package ``pkg`` (its ``plugin.py`` is ``body``) and the .dist-info of ``dist``
    declaring ``ep_name = pkg.plugin`` in the group ``kvbm.plugins``."""
    (root / pkg).mkdir(parents=True)
    (root / pkg / "__init__.py").write_text("")
    (root / pkg / "plugin.py").write_text(body.replace("{pkg}", pkg))
    # Dashes would end the distribution name in the folder name: importlib.metadata
    # would read "kvbm-dict-tier-1.0" as distribution "kvbm".
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[kvbm.plugins]\n{ep_name} = {pkg}.plugin\n")
    (info / "RECORD").write_text("")


@contextmanager
def on_sys_path(root: Path, module_prefix: str) -> Iterator[Path]:
    """Put ``root`` on sys.path; afterwards forget it and the modules imported from it."""
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        for name in list(sys.modules):
            if name.startswith(module_prefix):
                del sys.modules[name]
        importlib.invalidate_caches()
