"""Speculative READs of the remote tier's reader: blocks read from where the peer's
last leases had them while their lease request is on its way, kept only if the reply
puts them at the same address and their bytes give the checksum taken under the pin.

``SpeculativeReads`` is a part of ``_reader.BlockReader``, split out by idea: it uses
the reader's configuration, counters, address memory and its ``_locals``/``_copy``
(READs on the copy lanes, each part hashed by its lane)/``_local_addr``/``_sum_matches``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm.hashing import SequenceHash

from ._lanes import Lane
from ._peers import Peer, RemoteStats
from ._step import _Step
from .config import RemoteTierConfig

if TYPE_CHECKING:
    _Base = Any
else:
    _Base = object


class SpeculativeReads(_Base):
    """The speculative half of ``BlockReader`` (see the module's docstring)."""

    cfg: RemoteTierConfig
    block_bytes: int
    stats: RemoteStats
    _addrs: dict[tuple[str, bytes], int]

    def _can_speculate(self, peer: Peer, chunk: list[int], keys: Sequence[SequenceHash],
                       dst: Sequence[np.ndarray]) -> bool:
        """Whether ``chunk`` can be READ before its lease reply: checksum mode with
        ``speculative_reads``, every block's address remembered from an earlier lease
        of this peer, every destination registered."""
        if (self.cfg.verify != "checksum" or not self.cfg.speculative_reads or not self._addrs
                or peer.agent is None or not chunk):
            return False
        agent = str(peer.agent)
        return all((agent, bytes(keys[i])) in self._addrs and self._local_addr(dst[i]) is not None
                   for i in chunk)

    def _speculate(self, peer: Peer, lanes: Sequence[Lane], chunk: list[int],
                   keys: Sequence[SequenceHash], dst: Sequence[np.ndarray],
                   after: Callable[[], None] | None = None) -> _Step:
        """READ ``chunk`` from where the peer's last leases had it, while its lease request
        is on its way (``_can_speculate`` said every place is known), in READs of
        ``verify_bytes`` spread over the copy lanes, each hashed by its lane right after.

        The bytes are not trusted yet: ``_speculated`` keeps a block only if the lease
        reply puts it at the same address and the bytes match the checksum the peer
        took under the pin (what every checksummed READ is held to). So a slot
        rewritten before the pin is a miss, never data. Saves the lease round trip
        on blocks read again (the round trip was 0.07-0.29 ms here, a 16 MiB batch's
        copy 2.5 ms), and for a batch of one step the wait for its reply."""
        agent, bb = str(peer.agent), self.block_bytes
        s = _Step()
        s.idx = list(chunk)
        s.addrs = [self._addrs[(agent, bytes(keys[i]))] for i in chunk]
        at = dict(zip(s.idx, s.addrs))
        k = self._part_size(len(s.idx), len(lanes))
        parts = []
        for a in range(0, len(s.idx), k):
            p = _Step()
            p.idx = s.idx[a : a + k]
            p.handle = [(at[i], bb, 0) for i in p.idx]
            self._locals(p, dst)
            parts.append(p)
        self._copy(peer, lanes, parts, dst, hash_=True, after=after)
        for p in parts:
            s.got.update(p.got)
        self.stats.speculative_blocks += len(s.idx)
        return s

    def _speculated(
        self, peer: Peer, spec: _Step, cur: _Step, keys: Sequence[SequenceHash],
        ok: list[bool], bad: list[bytes],
    ) -> None:
        """Keep the speculatively READ blocks the lease reply ``cur`` put at the same
        address whose bytes gave the sum taken under the pin; leave in ``cur`` only the
        blocks still to READ (their address changed)."""
        at = dict(zip(spec.idx, spec.addrs))
        rest_idx: list[int] = []
        rest_sums: list[int] = []
        rest_remote: list[tuple[int, int, int]] = []
        remote: list[tuple[int, int, int]] = cur.handle
        kept = 0
        for i, want, r in zip(cur.idx, cur.sums, remote):
            if at.get(i) != r[0]:
                rest_idx.append(i)
                rest_sums.append(want)
                rest_remote.append(r)
                continue
            kept += 1
            if not self._sum_matches(peer, keys[i], spec.got[i], want):
                bad.append(keys[i])
                continue
            ok[i] = True
            self.stats.blocks_read += 1
            self.stats.bytes_read += self.block_bytes
        cur.idx, cur.sums, cur.handle = rest_idx, rest_sums, rest_remote
        self.stats.speculative_misses += len(spec.idx) - kept
