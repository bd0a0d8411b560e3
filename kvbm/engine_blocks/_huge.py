"""An engine's CPU KV tensors moved onto 2 MiB pages, in place (``engine_huge_pages``).

A copy that gathers an engine's 32 KiB runs from 4 KiB pages takes a TLB miss (and, on
memory the last copy swept from the cache, a page walk that misses too) every 4 KiB and
stops the prefetchers at each page: the sixth pass of ``docs/benchmarks/host.md`` found
the C copy of one engine-shaped 64-block batch 1.6-1.7x longer on 4 KiB pages than on
2 MiB pages, the biggest part of the engine gap. ``MADV_COLLAPSE`` (Linux 6.1+) copies
each 2 MiB range into one huge page, keeping the bytes and the addresses, but at
0.3-1 GB/s: 4 GiB took 3.8-13.6 s here, too long to hold up an engine's start.

``HugePages`` ('auto', the default of ``engine_huge_pages``) runs the collapse on a
daemon thread of its own after registration, ``CHUNK_BYTES`` a call (``ctypes``
releases the GIL; the thread is niced, so it takes an idle core's time), and returns
at once: copies made before it finishes run on the pages they find, small or huge.
The kernel collapses a range as khugepaged does (the range's page table entries are
cleared and the TLB flushed before its bytes are copied, so an access meanwhile waits
for the new page; pages pinned for DMA are left alone), so the engine's bytes do not
change. One info line when it finishes; one when the kernel refuses (then nothing
more is tried: the tensors stay on their pages, same bytes). ``True`` / 'on'
collapses before registration returns (``_native.advise_huge_pages``), False / 'off'
leaves the pages alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvbm.errors import LayoutError

from . import _native

log = logging.getLogger("kvbm")

#: Bytes one ``MADV_COLLAPSE`` call moves (tens of ms at the kernel's speed), so a
#: close waits at most one call and other threads' page faults never wait long.
CHUNK_BYTES = 64 * 2**20
_HUGE = 2 * 2**20
#: Errors that say the kernel will refuse every range (no MADV_COLLAPSE, THP off).
_FINAL = {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP}


def mode_of(value: Any) -> str:
    """``engine_huge_pages``'s value as 'auto', 'on' or 'off' (bools and None too)."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "on"
    if isinstance(value, str) and value.lower() in ("auto", "on", "off"):
        return value.lower()
    raise LayoutError(f"huge_pages: {value!r} is not a choice; use 'auto' (collapse in the "
                      "background), 'on' (before registration returns) or 'off'")


class HugePages:
    """One background collapse of ``spans`` (``(address, nbytes)`` of anonymous memory).

    ``keep`` holds the memory's owners alive until the thread ends. ``done_bytes`` grows
    as ranges land on 2 MiB pages; ``refused`` is the kernel's refusal (None while it
    agrees); ``wait`` blocks until the thread ends; ``stop`` ends it after the call
    under way.
    """

    def __init__(self, spans: Sequence[tuple[int, int]], keep: Any = None) -> None:
        self.spans = list(spans)
        self.done_bytes = 0
        self.skipped_bytes = 0
        self.refused: str | None = None
        self.seconds = 0.0
        self._keep = keep
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvbm-huge-pages", daemon=True)
        self._thread.start()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the collapse ended (all done, refused or stopped) within ``timeout``."""
        return self._finished.wait(timeout)

    def stop(self, timeout: float | None = 5.0) -> None:
        """End the collapse after the ``madvise`` call under way (bytes stay as they are)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            _nice_this_thread()
            f = _native._madvise()
            if f is None:
                self.refused = "madvise is not available on this platform"
            else:
                for addr, n in self.spans:
                    if self._stop.is_set() or not self._span(f, addr, n):
                        break
        except Exception as e:  # noqa: BLE001 - a helper thread: say so, change nothing
            self.refused = f"{type(e).__name__}: {e}"
        finally:
            self.seconds = time.perf_counter() - t0
            self._keep = None
            self._report()
            self._finished.set()

    def _span(self, f: Callable[[int, int, int], int], addr: int, n: int) -> bool:
        """Collapse one span's aligned interior chunk by chunk (then its two edge pages,
        best effort); False when the kernel refuses for good."""
        lo = -(-addr // _HUGE) * _HUGE
        hi = (addr + n) // _HUGE * _HUGE
        if hi <= lo:
            return True
        if f(lo, hi - lo, _native.MADV_HUGEPAGE) != 0:
            return self._refuse("MADV_HUGEPAGE", ctypes.get_errno())
        for a in range(lo, hi, CHUNK_BYTES):
            if self._stop.is_set():
                return False
            b = min(hi, a + CHUNK_BYTES)
            if f(a, b - a, _native.MADV_COLLAPSE) == 0:
                self.done_bytes += b - a
                continue
            err = ctypes.get_errno()
            if err in _FINAL:
                return self._refuse("MADV_COLLAPSE", err)
            self.skipped_bytes += b - a  # this range now (EAGAIN, ENOMEM): go on
        # The pages the span only partly covers (an allocator's neighbours share them:
        # same process, same bytes after): best effort, each alone.
        for edge, part in ((lo - _HUGE, lo - addr), (hi, addr + n - hi)):
            if part > 0 and not self._stop.is_set() and all(f(edge, _HUGE, a) == 0
                                for a in (_native.MADV_HUGEPAGE, _native.MADV_COLLAPSE)):
                self.done_bytes += part
        return True

    def _refuse(self, name: str, err: int) -> bool:
        self.refused = f"{name} refused ({os.strerror(err)}, errno {err})"
        return False

    def _report(self) -> None:
        mib = 2**20
        total = sum(n for _, n in self.spans)
        if self.refused is not None:
            log.info("kvbm: engine_huge_pages: %s after %.1f s; the engine's KV tensors stay on "
                     "the pages they have (%.0f of %.0f MiB on 2 MiB pages; same bytes, slower "
                     "scattered copies)", self.refused, self.seconds, self.done_bytes / mib,
                     total / mib)
        else:
            log.info("kvbm: engine_huge_pages: %.0f of %.0f MiB of the engine's KV tensors moved "
                     "onto 2 MiB pages in the background in %.1f s%s", self.done_bytes / mib,
                     total / mib, self.seconds,
                     f" ({self.skipped_bytes / mib:.0f} MiB the kernel could not move now)"
                     if self.skipped_bytes else " (stopped)" if self._stop.is_set() else "")


def _nice_this_thread() -> None:
    """This thread (only: Linux keeps a nice per thread) at nice 19: the collapse runs
    on a core nothing else wants, or slowly."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
