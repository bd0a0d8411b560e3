"""The host tier: one arena of ``num_slots × block_bytes`` bytes in DRAM.

Memory tiers hand the manager views of their slots, so engine blocks are gathered
straight into the arena and scattered straight out of it; ``read``/``write`` serve
lower tiers that move whole blocks. With CUDA present the arena is pinned by torch
(so device copies run at DMA speed); without it, torch refuses ``pin_memory`` and the
arena is private anonymous memory on transparent huge pages, faulted in at start
(``touch``) so that no first copy pays for it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np

from kvbm.config import is_generated_name
from kvbm.engine_blocks._native import copy_pairs, copy_runs, copy_threads_worth, share
from kvbm.errors import ConfigError
from kvbm.hashing import SequenceHash
from kvbm.layout import aligned_empty
from kvbm.machine import memory_available
from kvbm.sizes import format_size
from kvbm.tier import Tier, TierContext

from .config import SIZE_HINT, HostTierConfig

log = logging.getLogger("kvbm.host")


#: Huge-page size the unpinned arena is aligned to (x86-64 and arm64's 4K-granule THP).
_HUGE = 2 * 2**20


def _private_arena(nbytes: int) -> np.ndarray:
    """``nbytes`` of private anonymous memory, 2 MiB-aligned, advised for huge pages.

    Private, not ``mmap(-1, n)``'s shared mapping: shared anonymous memory lives in
    shmem, which takes huge pages only where ``shmem_enabled`` says so (``never`` by
    default), so a 32 KiB run a copy writes crosses eight 4 KiB pages, each its own
    TLB entry. Transparent huge pages serve a private mapping
    that asked for them (``MADV_HUGEPAGE``, honoured under THP ``madvise`` and
    ``always``). Elsewhere (no ``MAP_PRIVATE`` or ``madvise``), ``aligned_empty``.
    """
    import mmap

    flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if flags[0] is None or flags[1] is None:
        return aligned_empty(nbytes)
    mm = mmap.mmap(-1, nbytes + _HUGE, flags=flags[0] | flags[1])
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # a kernel without THP: 4 KiB pages, same bytes
            mm.madvise(advice)
    whole = np.frombuffer(mm, dtype=np.uint8)
    skip = -whole.ctypes.data % _HUGE
    return whole[skip : skip + nbytes]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class HostTier(Tier):
    """Blocks in one host-memory arena, addressed by slot."""

    kind: ClassVar[str] = "host"
    medium: ClassVar[str] = "CPU"

    @classmethod
    def check_chain(cls, index: int, chain: Sequence[tuple[str, type[Tier]]],
                    write_through: bool) -> None:
        """Refuse a second host tier the config did not name: two DRAM arenas are one
        larger arena, except that every block is copied between them and stored twice,
        so an unnamed repeat is a copy-paste slip. Named ones (a test standing in for a
        slower tier) start with a warning."""
        first = next(i for i, (_, c) in enumerate(chain) if issubclass(c, HostTier))
        if first == index:
            return
        name = chain[index][0]
        if is_generated_name(name, "host"):
            raise ConfigError(
                f"tier {name!r}: a second host tier (after {chain[first][0]!r}); two DRAM "
                "arenas only copy and store each block twice: give one host tier the capacity "
                "of both (or give this one a name of its own if you mean it)")
        log.warning("kvbm tier %r: a second host tier (after %r) copies and stores each block "
                    "twice; one host tier with the capacity of both holds more", name,
                    chain[first][0])

    def __init__(self, config: HostTierConfig, ctx: TierContext) -> None:  # type: ignore[override]
        super().__init__(config, ctx)
        self.pinned = False
        want_pin = config.pin == "always" or (config.pin == "auto" and _cuda_available())
        nbytes = self.num_slots * self.block_bytes
        self._tensor: Any = None
        if want_pin and not _cuda_available():
            raise ConfigError(
                f"tier {self.name!r}: key 'pin': value 'always' needs CUDA, which is not "
                "available; use pin: auto"
            )
        avail = memory_available()
        if nbytes > avail:
            # Touching (or pinning) more than is available ends in an OOM kill, not an error.
            raise ConfigError(
                f"tier {self.name!r}: capacity {format_size(nbytes)} exceeds the memory "
                f"available now ({format_size(avail)}); lower {SIZE_HINT} or free memory")
        try:
            if want_pin:
                import torch

                self._tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                self.arena = self._tensor.numpy()
                self.pinned = True
            else:
                self.arena = _private_arena(nbytes)
        except (MemoryError, RuntimeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (errno.ENOMEM, None):
                raise
            raise ConfigError(
                f"tier {self.name!r}: cannot allocate {format_size(nbytes)} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'out of memory'}); "
                f"lower {SIZE_HINT}") from None
        self.slots = self.arena.reshape(self.num_slots, self.block_bytes)
        if config.touch:
            # Fault the pages in now (a huge page at its first byte), not during the
            # first engine step.
            self.arena[:: 4096] = 0
        copy_runs()  # compile the copy loop now, not during the first engine step
        # As set; left at its default, only as many threads as pay here (one where a
        # second copies no faster: it would only add a hand-off and a wait).
        threads = (config.copy_threads if "copy_threads" in config.model_fields_set
                   else copy_threads_worth(config.copy_threads))
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix=f"kvbm-{self.name}")
            if threads > 1
            else None
        )
        self._threads = threads

    def peer_arena(self) -> np.ndarray:
        """The whole arena, ``[num_slots, block_bytes]``: a remote tier may serve it to peers."""
        return self.slots

    def slot_rows(self) -> np.ndarray:
        """The arena: the executor copies a batch to and from its rows by row number."""
        return self.slots

    def views(self, slots: Sequence[int]) -> list[np.ndarray]:
        s = self.slots
        return [s[i] for i in slots]

    def _copy(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        # One native call per thread's share (copy_pairs: no Python call per block, the
        # GIL released), so a batch split across threads copies in parallel.
        if self._pool is None or len(pairs) < 2:
            copy_pairs([d for d, _ in pairs], [s for _, s in pairs])
            return
        if copy_runs() is not None:
            # One address table, claimed in chunks by this thread and the pool's as
            # they start (no fixed halves: a thread that waits for a core takes less).
            with share(self._pool, self._threads):
                copy_pairs([d for d, _ in pairs], [s for _, s in pairs])
            return
        k = self._threads
        chunks = [pairs[i::k] for i in range(k)]

        def run(chunk: list[tuple[np.ndarray, np.ndarray]]) -> None:
            copy_pairs([d for d, _ in chunk], [s for _, s in chunk])

        list(self._pool.map(run, chunks))

    def write(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> list[bool]:
        self._copy([(self.slots[s], b) for s, b in zip(slots, src)])
        return [True] * len(slots)

    def read(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], dst: Sequence[np.ndarray]
    ) -> list[bool]:
        self._copy([(d, self.slots[s]) for s, d in zip(slots, dst)])
        return [True] * len(slots)

    def stats(self) -> dict[str, Any]:
        return {"pinned": self.pinned, "bytes": int(self.arena.nbytes)}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
