"""The remote tier's read pipeline: leased blocks, read with NIXL, then verified.

Per peer and in pipelined steps of ``pipeline_bytes``, ``BlockReader.read_from``
leases the blocks (the peer pins them and reports each block's address and xxh3),
posts one NIXL READ straight from the peer's arena into the destination buffers,
verifies each block's xxh3, and releases the lease. While step *i* transfers, step
*i+1* is leased and step *i-1* verified, so the control plane and checksums hide
behind the transfer. With ``verify: lease`` a block whose READ ended while its lease
still pinned it is trusted without hashing.

A block the peer lost, a checksum mismatch, a transfer error or timeout is a failed
block (``False``), never data; a peer that fails is dropped from the peer set.

Destination buffers are read into directly when their allocation can be registered
with NIXL (at most ``_MAX_REGIONS`` allocations, each registered once and kept until
close); any other buffer goes through a registered bounce buffer and one more copy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import xxhash

from kvbm.hashing import SequenceHash
from kvbm.layout import aligned_empty

from ._peers import Peer, PeerError, PeerSet, RemoteStats
from ._speculate import SpeculativeReads
from ._step import _Step
from .config import RemoteTierConfig

log = logging.getLogger("kvbm.remote")

#: Local destination regions registered with NIXL, at most; beyond, reads go
#: through a registered bounce buffer and one extra copy.
_MAX_REGIONS = 256
#: Lease requests in flight to one peer while this side copies (bounded, so that
#: neither side's socket buffer can fill with requests the other is not reading).
_LEASE_WINDOW = 3
#: A READ still running after this long asks the peer to progress its NIXL worker.
_PUMP_AFTER_S = 0.002
#: Peer slot addresses remembered from lease replies (for the speculative first READ);
#: the memory is forgotten all at once when it grows past this many blocks.
_ADDR_CACHE_MAX = 1 << 16


class BlockReader(SpeculativeReads):
    """Reads leased blocks from peers into local buffers with NIXL READs.

    ``agent`` and ``nixl_lock`` are the tier's NIXL agent and the lock every use of it
    takes; ``peers`` carries the requests and drops a peer that fails; ``stats`` is
    the tier's counters, bumped here.
    """

    def __init__(self, name: str, cfg: RemoteTierConfig, agent: Any,
                 nixl_lock: threading.RLock, block_bytes: int, peers: PeerSet,
                 stats: RemoteStats) -> None:
        self.name = name
        self.cfg = cfg
        self._agent = agent
        self._nixl_lock = nixl_lock
        self.block_bytes = block_bytes
        self._peers = peers
        self.stats = stats
        self._regions: dict[int, tuple[int, np.ndarray, Any]] = {}
        self._bounce_free: list[np.ndarray] = []
        self._step_blocks = max(1, cfg.pipeline_bytes // block_bytes)
        self._part_blocks = max(1, cfg.verify_bytes // block_bytes)
        # READs of less than a block: each piece is hashed into its block's running xxh3.
        self._piece_bytes = cfg.verify_bytes if cfg.verify_bytes < block_bytes else 0
        # Checksums of each READ run here while the next is read (xxhash releases the GIL).
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix=f"kvbm-{name}-verify")
        # (peer agent, key) -> the slot address its last lease reply gave.
        self._addrs: dict[tuple[str, bytes], int] = {}
        # The batch's last READ is checked on the reading thread (see read_from).
        self._inline_last = True

    def read_from(
        self, peer: Peer, idx: list[int], keys: Sequence[SequenceHash],
        dst: Sequence[np.ndarray], ok: list[bool],
    ) -> None:
        """Read ``idx`` from ``peer`` in pipelined steps.

        The first step is one READ long, so the copying starts after one short lease;
        the rest go ``pipeline_bytes`` at a time with up to ``_LEASE_WINDOW`` lease
        requests in flight, so the peer pins the next steps while this side copies
        (a release travels with the next lease request, in one write). Inside a step
        the READs go ``verify_bytes`` at a time and each part is checksummed on the
        worker thread while the next part is read: the bytes are hashed while they are
        still in the last-level cache. Hashing a whole step afterwards read them back
        from DRAM, and on a machine with few memory channels that slowed the copy
        beside it by a fifth (measured: see docs/benchmarks/remote.md).

        When every block of the first step has a remembered address (``_speculate``),
        the first step is a whole ``pipeline_bytes`` step, READ part by part before its
        lease reply is awaited, each part hashed on the worker while the next is read;
        the reply is then only compared against.
        """
        spec_ok = self._can_speculate(peer, idx[: self._step_blocks], keys, dst)
        first = min(len(idx), self._step_blocks if spec_ok else self._part_blocks)
        chunks = [idx[:first]]
        chunks += [idx[i : i + self._step_blocks] for i in range(first, len(idx), self._step_blocks)]
        verifying: list[Future[None]] = []
        cur: _Step | None = None
        part: _Step | None = None
        bad: list[bytes] = []
        # Running xxh3 of each block read in pieces (the verifier thread's alone); a
        # block whose piece failed is None, so its last piece cannot pass it.
        running: dict[int, Any] = {}
        sent_at: list[float] = []  # when each lease request was sent (replies come in order)
        by_lease = self.cfg.verify == "lease"
        spec: _Step | None = None
        try:
            with peer.lock:
                # Leases ask for their steps up to the window ahead, releases wait for
                # the next write: a 2-step batch costs the peer two reads, not four.
                releases: list[dict[str, Any]] = []
                for j in range(len(chunks)):
                    last_chunk = j == len(chunks) - 1
                    msgs: list[dict[str, Any]] = []
                    now = time.monotonic()
                    while len(sent_at) < len(chunks) and len(sent_at) - j <= _LEASE_WINDOW:
                        msgs.append(self._lease_msg(chunks[len(sent_at)], keys))
                        sent_at.append(now)
                    if msgs:
                        self._peers.send(peer, *releases, *msgs)
                        releases = []
                    if j == 0 and spec_ok:
                        spec = self._speculate(peer, chunks[0], keys, dst, last_chunk)
                    cur = self._leased(peer, chunks[j], sent_at[j], keys)
                    if j == 0 and spec is not None:
                        self._speculated(peer, spec, cur, keys, ok, bad)
                        spec = None
                    parts = self._parts(cur, dst)
                    if last_chunk and not parts[-1].idx:
                        # Nothing left to READ (every block came speculatively): the
                        # peer may unpin now.
                        releases.append({"op": "release", "lease": cur.lease})
                        self._peers.send(peer, *releases)
                        releases = []
                        cur = None
                    for n, part in enumerate(parts):
                        if not part.idx:
                            continue
                        self._post(peer, part, dst)
                        self._wait(peer, part)
                        self._release_handle(part)
                        check = True
                        if by_lease and part.deadline is not None:
                            if time.monotonic() > part.deadline:
                                # The lease may have lapsed mid-READ: the peer may have
                                # reused the slots, so these bytes are not trusted.
                                self.stats.lease_overruns += len(part.idx)
                                part.ok = False
                            check = False
                        if not check and not part.bounce:
                            self._accept(part, ok)
                        elif self._inline_last and last_chunk and n == len(parts) - 1:
                            # The batch's last READ: nothing left to overlap with. Its
                            # lease is released first (the READs are done), then it is
                            # hashed here and on the verifier at once, half each, rather
                            # than all on the verifier (a wake-up is a scheduling wait
                            # on a busy machine). In order: a piece's block may have
                            # earlier pieces still queued.
                            assert cur is not None
                            releases.append({"op": "release", "lease": cur.lease})
                            self._peers.send(peer, *releases)
                            releases = []
                            cur = None
                            for f in verifying:
                                f.result()
                            self._verify_split(peer, part, keys, dst, ok, bad, check, running)
                        else:
                            verifying.append(self._verifier.submit(
                                self._verify, peer, part, keys, dst, ok, bad, check, running
                            ))
                    part = None
                    if cur is not None:
                        releases.append({"op": "release", "lease": cur.lease})
                    cur = None
                if releases:
                    self._peers.send(peer, *releases)
                for f in verifying:
                    f.result()
                if bad:
                    # The peer's remembered checksums for these blocks may be stale
                    # (a slot rewritten under the same key): it recomputes them.
                    self._peers.send(peer, {"op": "suspect", "keys": bad})
        except PeerError as e:
            for s in (part, cur, spec):
                if s is not None:
                    self._abandon(s)
            # Leases granted but never received expire on the peer after their ttl,
            # or at once when the connection closes (dropping the peer closes it).
            self._peers.drop(peer, str(e))
        finally:
            for f in verifying:
                f.result()
            if spec is not None:
                for f in spec.digests:
                    f.result()

    def _parts(self, s: _Step, dst: Sequence[np.ndarray]) -> list[_Step]:
        """Split a leased step into READs of ``verify_bytes`` (they share its lease).

        Only for checksums, which want the bytes still cached; with ``verify: lease``
        one READ per step does, and costs fewer posts. Under the block size, each block
        is read in pieces (when every destination of the step is registered: a bounce
        buffer holds whole blocks)."""
        k = self._part_blocks
        if self.cfg.verify != "checksum":
            return [s]
        remote: list[tuple[int, int, int]] = s.handle
        pb, bb = self._piece_bytes, self.block_bytes
        if pb and s.idx and all(self._local_addr(dst[i]) is not None for i in s.idx):
            parts = []
            for i, want, (raddr, _, dev) in zip(s.idx, s.sums, remote):
                for off in range(0, bb, pb):
                    p = _Step()
                    p.idx, p.sums, p.handle = [i], [want], [(raddr + off, min(pb, bb - off), dev)]
                    p.lease, p.deadline = s.lease, s.deadline
                    p.off, p.length = off, min(pb, bb - off)
                    parts.append(p)
            s.handle = None
            return parts
        if len(s.idx) <= k:
            return [s]
        parts = []
        for a in range(0, len(s.idx), k):
            p = _Step()
            p.idx, p.sums, p.handle = s.idx[a : a + k], s.sums[a : a + k], remote[a : a + k]
            p.lease, p.deadline = s.lease, s.deadline
            parts.append(p)
        s.handle = None
        return parts

    def _verify_split(
        self, peer: Peer, s: _Step, keys: Sequence[SequenceHash], dst: Sequence[np.ndarray],
        ok: list[bool], bad: list[bytes], check: bool, running: dict[int, Any],
    ) -> None:
        """``_verify`` for the batch's last READ, its hashing split between this thread
        and the (then idle) verifier: whole registered blocks only, the sums compared
        here once both halves are done."""
        if s.length or s.bounce or not check or not s.ok or len(s.idx) < 2:
            self._verify(peer, s, keys, dst, ok, bad, check, running)
            return
        got: dict[int, int] = {}
        half = len(s.idx) // 2
        f = self._verifier.submit(self._digest, s.idx[:half], dst, got)
        try:
            self._digest(s.idx[half:], dst, got)
        finally:
            f.result()
        for i, want in zip(s.idx, s.sums):
            if not self._sum_matches(peer, keys[i], got[i], want):
                bad.append(keys[i])
                continue
            ok[i] = True
            self.stats.blocks_read += 1
            self.stats.bytes_read += self.block_bytes

    def _lease_msg(self, chunk: list[int], keys: Sequence[SequenceHash]) -> dict[str, Any]:
        return {"op": "lease", "keys": [keys[i] for i in chunk], "ttl": self.cfg.lease_timeout_s}

    def _leased(self, peer: Peer, chunk: list[int], sent_at: float,
                keys: Sequence[SequenceHash] = ()) -> _Step:
        """Receive the reply to the lease request for ``chunk`` sent at ``sent_at``."""
        reply = self._peers.recv(peer, "lease")
        s = _Step()
        s.lease = int(reply["lease"])
        ttl = reply.get("ttl")
        if isinstance(ttl, (int, float)) and ttl > 0:
            # The peer started the lease after this side sent the request, so it
            # lasts at least until sent_at + ttl; the margin covers clock-rate skew.
            s.deadline = sent_at + ttl * 0.99 - 0.002
        remote: list[tuple[int, int, int]] = []
        addrs, agent = self._addrs, str(peer.agent)
        if len(addrs) > _ADDR_CACHE_MAX:
            addrs.clear()
        for i, b in zip(chunk, reply["blocks"]):
            if b is None:
                self.stats.lease_misses += 1
                continue
            s.idx.append(i)
            s.sums.append(int(b[1]))
            remote.append((int(b[0]), self.block_bytes, 0))
            addrs[(agent, bytes(keys[i]))] = int(b[0])
        s.handle = remote  # the remote descriptors until _post turns them into a transfer
        return s

    def _post(self, peer: Peer, s: _Step, dst: Sequence[np.ndarray]) -> _Step:
        remote: list[tuple[int, int, int]] = s.handle
        s.handle = None
        if not s.idx:
            return s
        local: list[tuple[int, int, int]] = []
        for i in s.idx:
            addr = self._local_addr(dst[i])
            if addr is None:
                buf = self._bounce()
                s.bounce.append((buf, dst[i]))
                addr = int(buf.ctypes.data)
                self.stats.bounce_blocks += 1
            if s.length:
                assert not s.bounce, "pieces are read into registered memory only"
                local.append((addr + s.off, s.length, 0))
            else:
                local.append((addr, self.block_bytes, 0))
        assert peer.agent is not None, "a peer is posted to only while live"
        try:
            with self._nixl_lock:
                ldesc = self._agent.get_xfer_descs(local, "DRAM")
                rdesc = self._agent.get_xfer_descs(remote, "DRAM")
                s.handle = self._agent.initialize_xfer("READ", ldesc, rdesc, peer.agent)
                state = self._agent.transfer(s.handle)
        except Exception as e:
            self.stats.transfer_errors += 1
            self._abandon(s)
            raise PeerError(f"peer {peer.addr}: NIXL READ could not start ({e})") from None
        if state == "ERR":
            self.stats.transfer_errors += 1
            self._abandon(s)
            raise PeerError(f"peer {peer.addr}: NIXL READ failed at post")
        return s

    def _wait(self, peer: Peer, s: _Step) -> None:
        if s.handle is None:
            return
        start = time.monotonic()
        deadline = start + self.cfg.transfer_timeout_s
        asked = False
        while True:
            try:
                with self._nixl_lock:
                    state = self._agent.check_xfer_state(s.handle)
            except Exception as e:
                state = f"ERR ({e})"
            if state == "DONE":
                s.ok = True
                return
            if state != "PROC":
                self.stats.transfer_errors += 1
                raise PeerError(f"NIXL READ failed: {state}")
            if time.monotonic() > deadline:
                self.stats.transfer_errors += 1
                self._cancel_or_drain(s)
                raise PeerError(f"NIXL READ still running after {self.cfg.transfer_timeout_s}s")
            if not asked and time.monotonic() - start > _PUMP_AFTER_S:
                # Not done at once: the transport may need the peer to progress too
                # (the peer's poller runs after our hello and when asked, not always).
                asked = True
                self._peers.send(peer, {"op": "pump"})
            if self.cfg.progress_thread:
                time.sleep(0.0001)  # NIXL's thread progresses the transfer

    def _accept(self, s: _Step, ok: list[bool]) -> None:
        """Mark the blocks of a completed READ as read (the lease vouches for them)."""
        if not s.ok:
            return
        for i in s.idx:
            ok[i] = True
        self.stats.blocks_read += len(s.idx)
        self.stats.bytes_read += len(s.idx) * self.block_bytes

    def _verify(
        self, peer: Peer, s: _Step, keys: Sequence[SequenceHash], dst: Sequence[np.ndarray],
        ok: list[bool], bad: list[bytes], check: bool = True,
        running: dict[int, Any] | None = None,
    ) -> None:
        """Check each block that arrived against the peer's xxh3 (unless ``check`` is
        off: the lease vouches for them); only matches are True. A piece of a block
        (``s.length``) goes into the block's running xxh3 in ``running``; the block is
        checked at its last piece, and only if every piece arrived."""
        if s.length:
            self._verify_piece(peer, s, keys, dst, ok, bad, running)
            return
        if not s.ok:
            self._free_bounce(s)
            return
        bounce = {id(d): b for b, d in s.bounce}
        bb = self.block_bytes
        for i, want in zip(s.idx, s.sums):
            d = dst[i]
            src = bounce.get(id(d))
            got = want
            if check:
                got = xxhash.xxh3_64_intdigest(src if src is not None else d)  # type: ignore[arg-type]
            if not self._sum_matches(peer, keys[i], got, want):
                bad.append(keys[i])
                continue
            if src is not None:
                np.copyto(d, src)
            ok[i] = True
            self.stats.blocks_read += 1
            self.stats.bytes_read += bb
        self._free_bounce(s)

    def _sum_matches(self, peer: Peer, key: SequenceHash, got: int, want: int) -> bool:
        """Whether a block's bytes gave the checksum its peer took under the pin; a
        failure is counted and logged (the caller makes the block a miss)."""
        if got == want:
            return True
        self.stats.checksum_failures += 1
        log.warning("kvbm tier %r: block %s from peer %s failed its checksum "
                    "(xxh3 %016x, peer said %016x); a miss",
                    self.name, key.hex(), peer.addr, got, want)
        return False

    def _verify_piece(
        self, peer: Peer, s: _Step, keys: Sequence[SequenceHash], dst: Sequence[np.ndarray],
        ok: list[bool], bad: list[bytes], running: dict[int, Any] | None,
    ) -> None:
        assert running is not None and len(s.idx) == 1, "a piece is of one block"
        i, want = s.idx[0], s.sums[0]
        if s.off == 0:
            running[i] = xxhash.xxh3_64()
        h = running.get(i)
        if h is None:
            return  # an earlier piece of this block failed: it stays a miss
        if not s.ok:
            running[i] = None
            return
        h.update(dst[i].reshape(-1)[s.off : s.off + s.length])  # registered: uint8, contiguous
        if s.off + s.length < self.block_bytes:
            return
        del running[i]
        got = h.intdigest()
        if not self._sum_matches(peer, keys[i], got, want):
            bad.append(keys[i])
            return
        ok[i] = True
        self.stats.blocks_read += 1
        self.stats.bytes_read += self.block_bytes

    def _cancel_or_drain(self, s: _Step) -> None:
        """Stop a timed-out READ before its buffers can be reused.

        A READ that NIXL cannot cancel may still write into its destination later;
        the executor would by then have handed those staging buffers to another block.
        So if the cancel fails, wait until the transfer ends (UCX fails it when the
        peer is gone): a stall is better than bytes of one block landing in another.
        """
        h, s.handle = s.handle, None
        if h is None or isinstance(h, list):
            return
        err = self._release_xfer(h)
        if err is None:
            return
        log.warning("kvbm tier %r: a timed-out NIXL READ cannot be cancelled (%s); "
                    "waiting for it to end before its buffers are reused", self.name, err)
        while True:
            with self._nixl_lock:
                try:
                    state = self._agent.check_xfer_state(h)
                except Exception:
                    state = "ERR"
            if state != "PROC":
                break
            time.sleep(0.001)
        with self._nixl_lock, contextlib.suppress(Exception):
            self._agent.release_xfer_handle(h)

    def _abandon(self, s: _Step) -> None:
        self._release_handle(s)
        self._free_bounce(s)

    def _free_bounce(self, s: _Step) -> None:
        """Give a step's bounce buffers back for the next READ."""
        self._bounce_free.extend(b for b, _ in s.bounce)
        s.bounce = []

    def _release_handle(self, s: _Step) -> None:
        h, s.handle = s.handle, None
        if h is None or isinstance(h, list):
            return
        err = self._release_xfer(h)
        if err is not None:  # a transfer that cannot be cancelled stays with NIXL
            log.debug("kvbm remote: releasing a transfer handle failed (%s)", err)

    def _release_xfer(self, h: Any) -> Exception | None:
        """Release a NIXL transfer handle; the error when NIXL refused (still running)."""
        with self._nixl_lock:
            try:
                self._agent.release_xfer_handle(h)
            except Exception as e:
                return e
        return None

    # -- local memory -----------------------------------------------------------
    def _local_addr(self, buf: np.ndarray) -> int | None:
        """The address of ``buf`` if it lies in NIXL-registered memory (registering its
        whole underlying allocation the first time), else None for the bounce path."""
        if buf.dtype != np.uint8 or buf.nbytes != self.block_bytes or not buf.flags.c_contiguous:
            return None
        addr = int(buf.ctypes.data)
        root = buf
        while isinstance(root.base, np.ndarray):
            root = root.base
        raddr = int(root.ctypes.data)
        hit = self._regions.get(raddr)
        if hit is not None and hit[0] == root.nbytes:
            return addr
        if len(self._regions) >= _MAX_REGIONS or not root.flags.c_contiguous:
            return None
        try:
            with self._nixl_lock:
                reg = self._agent.register_memory([(raddr, int(root.nbytes), 0, "")], "DRAM")
        except Exception as e:
            log.debug("kvbm remote: registering %d bytes failed (%s); bouncing", root.nbytes, e)
            return None
        # Keep ``root`` alive: NIXL holds its address until deregistered at close.
        self._regions[raddr] = (int(root.nbytes), root, reg)
        return addr

    def _bounce(self) -> np.ndarray:
        if self._bounce_free:
            return self._bounce_free.pop()
        buf = aligned_empty(self.block_bytes)
        with self._nixl_lock:
            reg = self._agent.register_memory([(int(buf.ctypes.data), buf.nbytes, 0, "")], "DRAM")
        self._regions[int(buf.ctypes.data)] = (buf.nbytes, buf, reg)
        return buf

    def close(self) -> None:
        """Deregister every local region and bounce buffer; stop the verifier thread."""
        with self._nixl_lock:
            for _, _, reg in self._regions.values():
                with contextlib.suppress(Exception):
                    self._agent.deregister_memory(reg)
            self._regions.clear()
        self._bounce_free.clear()
        self._verifier.shutdown(wait=False)
