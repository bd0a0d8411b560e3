"""Block data moved by NIXL's POSIX backend (``io_engine: nixl``).

One NIXL transfer carries a whole batch: DRAM descriptors for the buffers, FILE
descriptors ``(offset, length, fd)`` for the slots. Slot headers stay on the posix
path in ``tier.py`` (they are 4 KiB each and their order matters). NIXL's agent is
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
from kvbm.layout import aligned_empty

from .files import StripeFile
from .format import PAGE, Geometry


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
