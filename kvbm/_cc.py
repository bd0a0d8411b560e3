"""Compile a small C source at run time and load it with ``ctypes``: kvbm's native loops.

The system's C compiler (``$CC``, else ``cc`` or ``gcc``) builds the source into a
private temporary directory (mode 0700), the library is mapped, and the directory is
removed. Nothing is cached on disk, so no file another user could replace is ever
loaded. Without a compiler, or when it fails, ``build`` returns None and the caller
keeps its pure-Python (or numpy) path, which gives the same results. ``Once`` holds
what a module builds from the library (its typed functions), built at the first call
and kept for the rest of the process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger("kvbm")

__all__ = ["Once", "build", "compiler"]

T = TypeVar("T")
#: Every ``Once`` alive, for a forked child to give each a fresh lock.
_instances: weakref.WeakSet[Once[Any]] = weakref.WeakSet()


def compiler() -> str | None:
    """The C compiler to use: ``$CC`` when it is on the path, else ``cc`` or ``gcc``."""
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def build(source: str, what: str, fallback: str, flags: tuple[str, ...] = ("-O2",),
          loader: Callable[[str], ctypes.CDLL] = ctypes.CDLL,
          capi: bool = False) -> ctypes.CDLL | None:
    """``source`` compiled into a shared library and loaded by ``loader`` (``ctypes.CDLL``
    releases the GIL around each call, ``ctypes.PyDLL`` keeps it: for code that calls
    the C API); None (logged at debug level, naming ``what`` and the ``fallback`` used
    instead) when it cannot be. ``capi``: the source includes ``Python.h`` and calls the
    C API: compiled against this interpreter's headers and loaded with ``ctypes.PyDLL``
    (in place of ``loader``)."""
    if capi:
        flags = (*flags, f"-I{sysconfig.get_paths().get('include', '')}")
        loader = ctypes.PyDLL
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


class Once(Generic[T]):
    """A value built by ``build`` at the first call and kept for the rest of the process:
    ``build`` runs once however many threads call at the same time (the others wait for
    its result), and a None it returns (no compiler, a failed load check) is kept too,
    never built again. An exception in ``build`` reaches the caller and keeps nothing:
    the next call builds again. A forked child keeps the value built before the fork;
    one forked while another thread was building gets a fresh lock (that thread is not
    in the child to release it) and builds the value itself at its first call."""

    def __init__(self, build: Callable[[], T | None]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._done = False
        self._value: T | None = None
        _instances.add(self)

    def __call__(self) -> T | None:
        if not self._done:
            with self._lock:
                if not self._done:
                    self._value = self._build()
                    self._done = True  # after the value: a reader that sees True sees it
        return self._value

    @property
    def done(self) -> bool:
        """Whether the value is built (it may be None): a call now builds nothing."""
        return self._done

    def _after_fork(self) -> None:
        self._lock = threading.Lock()


def _reinit_locks() -> None:
    for o in list(_instances):
        o._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_locks)
