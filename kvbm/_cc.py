"""Compile a small C source at run time and load it with ``ctypes``: kvbm's native loops.

The system's C compiler (``$CC``, else ``cc`` or ``gcc``) builds the source into a
private temporary directory (mode 0700), the library is mapped, and the directory is
removed. Nothing is cached on disk, so no file another user could replace is ever
loaded. Without a compiler, or when it fails, ``build`` returns None and the caller
keeps its pure-Python (or numpy) path, which gives the same results.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable

log = logging.getLogger("kvbm")

__all__ = ["build", "compiler"]


def compiler() -> str | None:
    """The C compiler to use: ``$CC`` when it is on the path, else ``cc`` or ``gcc``."""
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def build(source: str, what: str, fallback: str, flags: tuple[str, ...] = ("-O2",),
          loader: Callable[[str], ctypes.CDLL] = ctypes.CDLL) -> ctypes.CDLL | None:
    """``source`` compiled into a shared library and loaded by ``loader`` (``ctypes.CDLL``
    releases the GIL around each call, ``ctypes.PyDLL`` keeps it: for code that calls
    the C API); None (logged at debug level, naming ``what`` and the ``fallback`` used
    instead) when it cannot be."""
    cc = compiler()
    if cc is None:
        log.debug("kvbm: no C compiler found; %s uses %s", what, fallback)
        return None
    with tempfile.TemporaryDirectory(prefix="kvbm-native-") as d:
        src = os.path.join(d, "native.c")
        lib = os.path.join(d, "native.so")
        with open(src, "w") as f:
            f.write(source)
        try:
            r = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", lib, src],
                               capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.debug("kvbm: compiling %s failed (%s); using %s", what, e, fallback)
            return None
        if r.returncode != 0:
            log.debug("kvbm: compiling %s failed (%s); using %s", what, r.stderr.strip()[:200],
                      fallback)
            return None
        try:
            return loader(lib)  # mapped now: the file may go with the directory
        except OSError as e:
            log.debug("kvbm: loading %s failed (%s); using %s", what, e, fallback)
            return None
