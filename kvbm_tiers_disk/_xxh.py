"""XXH3-64 of a block with the GIL released, so checksums overlap other threads' reads.

``xxhash.xxh3_64_intdigest`` holds the GIL while it hashes: with several I/O threads,
one thread's checksum then stalls the others between their reads, and the checksums
of a batch run one after another. The same C function, ``XXH3_64bits`` (seed 0), is
exported by python-xxhash's own extension module (and by the system's libxxhash);
called through ``ctypes`` it runs with the GIL released. At load the native result is
checked against ``xxh3_64_intdigest`` on a test vector; any difference, or a missing
symbol, falls back to ``xxh3_64_intdigest``. The value is the same either way, so
blocks written by one path verify on the other.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable

import numpy as np
import xxhash

_Fn = Callable[[int, int], int]


def _candidates() -> list[str]:
    here = os.path.dirname(xxhash.__file__)
    return sorted(glob.glob(os.path.join(here, "_xxhash*.so"))) + ["libxxhash.so.0"]


def _load() -> _Fn | None:
    probe = np.frombuffer(bytes(range(256)) * 37, dtype=np.uint8)
    want = xxhash.xxh3_64_intdigest(probe)
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            fn = lib.XXH3_64bits
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        fn.restype = ctypes.c_uint64
        if fn(probe.ctypes.data, probe.nbytes) == want and fn(probe.ctypes.data, 0) == \
                xxhash.xxh3_64_intdigest(b""):
            return fn  # type: ignore[no-any-return]
    return None


_native = _load()


def native() -> bool:
    """True when checksums run with the GIL released."""
    return _native is not None


def xxh3_64(buf: np.ndarray) -> int:
    """``xxhash.xxh3_64_intdigest(buf)``, the GIL released where the C symbol was found."""
    fn = _native
    if fn is None or not buf.flags.c_contiguous:
        return xxhash.xxh3_64_intdigest(buf)
    return int(fn(buf.__array_interface__["data"][0], buf.nbytes))
