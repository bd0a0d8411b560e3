"""Block data moved by NIXL's POSIX backend (``io_engine: nixl``).

One NIXL transfer carries a whole batch: DRAM descriptors for the buffers, FILE
descriptors ``(offset, length, fd)`` for the slots. Slot headers stay on the posix
path (``pyloop.py``) (they are 4 KiB each and their order matters). NIXL's agent is
not thread-safe in its default sync mode, so transfers are serialized by a lock;
the backend itself keeps the batch's requests in flight.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbm.errors import ConfigError
from kvbm.hashing import SequenceHash
from kvbm.layout import aligned_empty

from ._xxh import xxh3_64
from .base import _ZERO_PAGE
from .files import StripeFile
from .format import PAGE, Geometry
from .pyloop import PythonLoop


class NixlEngine:
    """A NIXL agent with the POSIX backend, moving slot data for one disk tier."""

    def __init__(self, tier: str, stripes: list[StripeFile]) -> None:
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except ImportError as e:
            raise ConfigError(
                f"disk tier {tier!r}: key 'io_engine': value 'nixl' needs the nixl package "
                f"({e}); pip install 'kvbm[remote]' or use io_engine: posix"
            ) from None
        self.name = f"kvbm-disk-{tier}-{os.getpid()}-{id(self):x}"
        agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=False, backends=[]))
        if "POSIX" not in agent.plugin_list:
            raise ConfigError(
                f"disk tier {tier!r}: key 'io_engine': NIXL has no POSIX plugin here "
                f"(plugins: {', '.join(agent.plugin_list)}); use io_engine: posix"
            )
        agent.create_backend("POSIX", {})
        self.agent: Any = agent
        self.stripes = stripes
        self._lock = threading.Lock()

    def transfer(
        self,
        op: str,
        where: Sequence[tuple[StripeFile, int]],
        bufs: Sequence[np.ndarray],
        geom: Geometry,
        mask: Sequence[bool],
    ) -> list[bool]:
        """Move ``bufs[i]`` to (``WRITE``) or from (``READ``) slot ``where[i]`` where ``mask[i]``."""
        idx = [i for i, m in enumerate(mask) if m]
        if not idx:
            return [False] * len(mask)
        stride = geom.stride
        bounce: dict[int, np.ndarray] = {}
        local: list[tuple[int, int, int]] = []
        remote: list[tuple[int, int, int]] = []
        regs: list[tuple[int, int, int, str]] = []
        fds = {st.fd for st, _ in (where[i] for i in idx)}
        for i in idx:
            b = bufs[i]
            if b.ctypes.data % PAGE or b.nbytes != stride:
                # O_DIRECT wants aligned, whole-page buffers: bounce odd ones.
                t = aligned_empty(stride)
                if op == "WRITE":
                    np.copyto(t[: b.nbytes], b)
                bounce[i] = t
                b = t
            st, loc = where[i]
            local.append((b.ctypes.data, stride, 0))
            regs.append((b.ctypes.data, stride, 0, ""))
            remote.append((geom.data_offset(loc), stride, st.fd))
        a = self.agent
        with self._lock:
            mreg = a.register_memory(regs, "DRAM", backends=["POSIX"])
            freg = a.register_memory([(0, 0, fd, "") for fd in fds], "FILE", backends=["POSIX"])
            try:
                h = a.initialize_xfer(op, a.get_xfer_descs(local, "DRAM"),
                                      a.get_xfer_descs(remote, "FILE"), self.name,
                                      backends=["POSIX"])
                try:
                    state = a.transfer(h)
                    while state == "PROC":
                        state = a.check_xfer_state(h)
                finally:
                    a.release_xfer_handle(h)
            except Exception:
                state = "ERR"
            finally:
                a.deregister_memory(mreg, backends=["POSIX"])
                a.deregister_memory(freg, backends=["POSIX"])
        ok = state == "DONE"
        if ok and op == "READ":
            for i, t in bounce.items():
                np.copyto(bufs[i], t[: bufs[i].nbytes])
        out = [False] * len(mask)
        for i in idx:
            out[i] = ok
        return out

    def close(self) -> None:
        self.agent = None


class NixlPath(PythonLoop):
    """The tier's write and read through a ``NixlEngine`` (``io_engine: nixl``)."""

    def _engine_write(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> list[bool]:
        # Headers stay on the posix path (4 KiB each); NIXL moves the data in one transfer.
        def invalidate(i: int) -> bool:
            st, local = self._locate(slots[i])
            self._keys[slots[i]] = None
            if not self._hdr_live[slots[i]]:
                return True
            try:
                os.pwritev(st.fd, [_ZERO_PAGE], self.geom.header_offset(local))
            except OSError as e:
                self._fault("write_errors", e, "header invalidation of slot %d failed", slots[i])
                return False
            self._hdr_live[slots[i]] = 0
            return True

        ok = self._run(invalidate, len(slots))
        flat = [s.reshape(-1) for s in src]
        moved = self._engine.transfer("WRITE", [self._locate(s) for s in slots], flat, self.geom, ok)
        ok = [a and b for a, b in zip(ok, moved, strict=True)]
        if not all(moved):
            self._fault("write_errors", None, "NIXL write failed for %d blocks", moved.count(False))
        sums = [xxh3_64(f) if g else None for f, g in zip(flat, ok, strict=True)]
        if self.cfg.durable and any(ok):
            return self._sync_then_headers(slots, keys, sums, ok)
        res = self._run(
            lambda i: ok[i] and self._write_header(slots[i], keys[i], sums[i] or 0), len(slots)
        )
        good = sum(res)
        self._add(blocks_written=good, bytes_written=good * self.block_bytes)
        return res

    def _engine_read(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], dst: Sequence[np.ndarray]
    ) -> list[bool]:
        ok = [self._keys[s] == k for s, k in zip(slots, keys, strict=True)]
        for g, s in zip(ok, slots, strict=True):
            if not g:
                self._fault("key_mismatches", None, "slot %d does not hold the requested block", s)
        flat = [d.reshape(-1) for d in dst]
        moved = self._engine.transfer("READ", [self._locate(s) for s in slots], flat, self.geom, ok)
        out = []
        for s, f, g, m in zip(slots, flat, ok, moved, strict=True):
            if g and not m:
                self._fault("read_errors", None, "NIXL read of slot %d failed", s)
            good = g and m and xxh3_64(f) == self._sums[s]
            if g and m and not good:
                self._fault("checksum_failures", None, "slot %d failed its checksum", s)
            out.append(good)
        n = sum(out)
        self._add(blocks_read=n, bytes_read=n * self.block_bytes)
        return out
