"""The remote tier's read pipeline: leased blocks, read with NIXL, then verified.

Per peer and in pipelined steps of ``pipeline_bytes``, ``BlockReader.read_from``
leases the blocks (the peer pins them and reports each block's address and xxh3),
READs them straight from the peer's arena into the destination buffers in parts of
``verify_bytes`` spread over ``read_threads`` copy lanes (``_lanes``: a thread and a
NIXL agent each; the lane that READ a part hashes it right after, while the others
copy, and a lane with nothing left to READ shares the last READs' hashes), compares each block's xxh3 and releases the lease. While a step is copied the
next ones are already leased, so the control plane hides behind the transfer. With
``verify: lease`` a block whose READ ended while its lease still pinned it is trusted
without hashing.

A block the peer lost, a checksum mismatch, a transfer error or timeout is a failed
block (``False``), never data; a peer that fails is dropped from the peer set.

Destination buffers are read into directly when their allocation can be registered
with NIXL (at most ``_MAX_REGIONS`` allocations, each registered once and kept until
close); any other buffer goes through a registered bounce buffer and one more copy.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xxhash

from kvbm.hashing import SequenceHash
from kvbm.layout import aligned_empty

from ._lanes import CopyLanes, Lane
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
    the tier's counters, bumped here; ``make_agent(k)`` makes the NIXL agent of copy
    lane ``k`` (``read_threads`` > 1; without it the calling thread READs alone).
    """

    def __init__(self, name: str, cfg: RemoteTierConfig, agent: Any,
                 nixl_lock: threading.RLock, block_bytes: int, peers: PeerSet,
                 stats: RemoteStats, make_agent: Callable[[int], Any] | None = None) -> None:
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
        # The threads that READ (and hash) one batch at once, each with its own agent.
        self._lanes = CopyLanes(name, cfg.read_threads, agent, nixl_lock, make_agent)
        self._lanes.warm()  # the extra lanes' agents made now, not in the first read
        self._pump_lock = threading.Lock()  # lanes ask the peer to progress one at a time
        # (peer agent, key) -> the slot address its last lease reply gave.
        self._addrs: dict[tuple[str, bytes], int] = {}
        # id(buffer) -> (the buffer, its address in a registered region): see _local_addr.
        self._addr_of: dict[int, tuple[np.ndarray, int]] = {}

    def read_from(
        self, peer: Peer, idx: list[int], keys: Sequence[SequenceHash],
        dst: Sequence[np.ndarray], ok: list[bool],
    ) -> None:
        """Read ``idx`` from ``peer`` in pipelined steps.

        The first step is one READ per lane long, so the copying starts after one short
        lease; the rest go ``pipeline_bytes`` at a time with up to ``_LEASE_WINDOW``
        lease requests in flight, so the peer pins the next steps while this side
        copies (a release travels with the next lease request, in one write). Inside a
        step the READs go ``verify_bytes`` at a time, spread over the copy lanes
        (``read_threads``, see ``_lanes``): each lane READs a part and hashes it right
        after, while the bytes are still in the last-level cache and the other lanes
        copy. Hashing a whole step afterwards read them back from DRAM, and on a
        machine with few memory channels that slowed the copy beside it by a fifth
        (measured: see docs/benchmarks/remote.md).

        When every block of the first step has a remembered address (``_speculate``),
        the first step is a whole ``pipeline_bytes`` step, READ and hashed before its
        lease reply is awaited; the reply is then only compared against.
        """
        lanes = self._lanes.for_peer(peer)
        spec_ok = self._can_speculate(peer, idx[: self._step_blocks], keys, dst)
        first = min(len(idx), self._step_blocks if spec_ok else self._part_blocks * len(lanes))
        chunks = [idx[:first]]
        chunks += [idx[i : i + self._step_blocks] for i in range(first, len(idx), self._step_blocks)]
        cur: _Step | None = None
        parts: list[_Step] = []
        bad: list[bytes] = []
        sent_at: list[float] = []  # when each lease request was sent (replies come in order)
        by_lease = self.cfg.verify == "lease"
        spec: _Step | None = None
        try:
            with peer.lock:
                # Leases ask for their steps up to the window ahead, releases wait for
                # the next write: a 2-step batch costs the peer two reads, not four.
                releases: list[dict[str, Any]] = []
                for j in range(len(chunks)):

                    def send_leases(j: int = j, releases: list[dict[str, Any]] = releases) -> None:
                        msgs: list[dict[str, Any]] = []
                        now = time.monotonic()
                        while len(sent_at) < len(chunks) and len(sent_at) - j <= _LEASE_WINDOW:
                            msgs.append(self._lease_msg(chunks[len(sent_at)], keys))
                            sent_at.append(now)
                        if msgs:
                            self._peers.send(peer, *releases, *msgs)
                            releases.clear()

                    # The lease request goes out before the lanes get their parts: on two
                    # cores the peer pins while the lanes wake (sent once they READ, the
                    # peer's work preempted a lane: 0.4 ms more per 16 MiB read, load 2).
                    send_leases()
                    if j == 0 and spec_ok:
                        # Its reply is read once the calling thread has nothing left to
                        # READ, while the other lanes end theirs.
                        replies: list[_Step] = []

                        def first_reply(out: list[_Step] = replies) -> None:
                            out.append(self._leased(peer, chunks[0], sent_at[0], keys))

                        spec = self._speculate(peer, lanes, chunks[0], keys, dst, after=first_reply)
                        cur = replies[0] if replies else self._leased(peer, chunks[0], sent_at[0], keys)
                    else:
                        cur = self._leased(peer, chunks[j], sent_at[j], keys)
                    if j == 0 and spec is not None:
                        self._speculated(peer, spec, cur, keys, ok, bad)
                        spec = None
                    # verify: lease trusts a READ that ends inside its lease (a peer that
                    # says no ttl gets checksums instead).
                    trust = by_lease and cur.deadline is not None
                    parts = self._parts(cur, dst, len(lanes))
                    if parts:
                        for p in parts:
                            p.trust = trust
                            self._locals(p, dst)
                        self._copy(peer, lanes, parts, dst, hash_=not trust)
                    # The READs are done: the peer may unpin (with the next write).
                    releases.append({"op": "release", "lease": cur.lease})
                    cur = None
                    if j == len(chunks) - 1:
                        self._peers.send(peer, *releases)
                        releases.clear()
                    self._settle(peer, parts, keys, dst, ok, bad)
                    parts = []
                if bad:
                    # The peer's remembered checksums for these blocks may be stale
                    # (a slot rewritten under the same key): it recomputes them.
                    self._peers.send(peer, {"op": "suspect", "keys": bad})
        except PeerError as e:
            for s in (*parts, cur, spec):
                if s is not None:
                    self._free_bounce(s)
            self._lanes.forget(peer)
            # Leases granted but never received expire on the peer after their ttl,
            # or at once when the connection closes (dropping the peer closes it).
            self._peers.drop(peer, str(e))

    def _parts(self, s: _Step, dst: Sequence[np.ndarray], lanes: int) -> list[_Step]:
        """Split a leased step into READs of ``verify_bytes`` (they share its lease).

        With ``verify: lease`` nothing is hashed, so a step is split only to give each
        lane a share. Under the block size, each block is read in pieces (when every
        destination of the step is registered: a bounce buffer holds whole blocks)."""
        if not s.idx:
            return []
        k = self._part_size(len(s.idx), lanes)
        if self.cfg.verify != "checksum":
            k = -(-len(s.idx) // lanes)
        remote: list[tuple[int, int, int]] = s.handle
        s.handle = None
        pb, bb = self._piece_bytes, self.block_bytes
        parts = []
        if pb and self.cfg.verify == "checksum" and all(
                self._local_addr(dst[i]) is not None for i in s.idx):
            for i, want, (raddr, _, dev) in zip(s.idx, s.sums, remote):
                for off in range(0, bb, pb):
                    p = _Step()
                    p.idx, p.sums, p.handle = [i], [want], [(raddr + off, min(pb, bb - off), dev)]
                    p.lease, p.deadline = s.lease, s.deadline
                    p.off, p.length = off, min(pb, bb - off)
                    parts.append(p)
            return parts
        for a in range(0, len(s.idx), k):
            p = _Step()
            p.idx, p.sums, p.handle = s.idx[a : a + k], s.sums[a : a + k], remote[a : a + k]
            p.lease, p.deadline = s.lease, s.deadline
            parts.append(p)
        return parts

    def _part_size(self, n: int, lanes: int) -> int:
        """Blocks per READ in a step of ``n`` blocks: ``verify_bytes``, but with more than
        one lane at least one part per lane. A lane free before the others takes the
        hashes of their last READs (``CopyLanes.run``), so a small step is not cut
        finer: at 16 MiB two parts of 8 MiB gave 0.69 / 0.71 of raw where four of 4 MiB
        gave 0.67 / 0.64 (medians of 40 interleaved repetitions, two runs, load 1.9-2.3;
        each READ costs ~0.05 ms outside the copy)."""
        if lanes == 1:
            return self._part_blocks
        return min(self._part_blocks, max(1, -(-n // lanes)))

    def _copy(self, peer: Peer, lanes: Sequence[Lane], parts: list[_Step],
              dst: Sequence[np.ndarray], hash_: bool,
              after: Callable[[], None] | None = None) -> None:
        """READ ``parts`` on the lanes, each block hashed (``hash_``) right after its
        part's READ, by its lane or by a lane with nothing left to READ (see
        ``CopyLanes.run``, which also says when ``after`` runs). A block read
        in pieces is one unit, so its pieces are READ and hashed in order by one lane."""
        units: list[list[_Step]] = []
        for p in parts:
            if p.length and p.off and units:
                units[-1].append(p)
            else:
                units.append([p])

        def work(lane: Lane, unit: list[_Step]) -> list[Callable[[], None]]:
            for p in unit:
                self._read(lane, peer, p)
            if not hash_:
                return []
            if unit[0].length:
                return [lambda: self._hash_unit(unit, dst)]
            return [functools.partial(self._hash_block, p, i, dst) for p in unit for i in p.idx]

        self._lanes.run(lanes, units, work, after)

    def _read(self, lane: Lane, peer: Peer, s: _Step) -> None:
        """One part's READ on ``lane``, start to end (its handle released)."""
        try:
            self._post(peer, s, lane)
            self._wait(peer, s, lane)
        except BaseException:
            self._release_handle(s, lane)
            raise
        s.done_at = time.monotonic()
        self._release_handle(s, lane)

    def _hash_unit(self, unit: Sequence[_Step], dst: Sequence[np.ndarray]) -> None:
        """xxh3 of each block the parts of ``unit`` READ, into each part's ``got``
        (from its bounce buffer where it has one). A block in pieces gets its sum on its
        last piece's ``got``, and only if every piece arrived (``ok``), in order."""
        h: Any = None
        for s in unit:
            if s.length:
                i = s.idx[0]
                if s.off == 0:
                    h = xxhash.xxh3_64()
                if h is None:
                    continue  # an earlier piece of this block failed: it stays a miss
                if not s.ok:
                    h = None
                    continue
                h.update(dst[i].reshape(-1)[s.off : s.off + s.length])  # registered: uint8
                if s.off + s.length >= self.block_bytes:
                    s.got[i] = h.intdigest()
                    h = None
                continue
            if not s.ok:
                continue
            bounce = {id(d): b for b, d in s.bounce}
            for i in s.idx:
                src = bounce.get(id(dst[i]))
                s.got[i] = xxhash.xxh3_64_intdigest(src if src is not None else dst[i])  # type: ignore[arg-type]

    def _hash_block(self, s: _Step, i: int, dst: Sequence[np.ndarray]) -> None:
        """xxh3 of block ``i`` of the whole-block part ``s`` into ``s.got`` (from its bounce
        buffer where it has one), if the part's READ ended well."""
        if not s.ok:
            return
        src = next((b for b, d in s.bounce if d is dst[i]), None) if s.bounce else None
        s.got[i] = xxhash.xxh3_64_intdigest(src if src is not None else dst[i])  # type: ignore[arg-type]

    def _settle(
        self, peer: Peer, parts: Sequence[_Step], keys: Sequence[SequenceHash],
        dst: Sequence[np.ndarray], ok: list[bool], bad: list[bytes],
    ) -> None:
        """Mark the blocks of READ parts that passed: with checksums, those whose xxh3
        matches the peer's; with ``trust`` (verify: lease), those whose READ ended
        inside the lease. Only they are True; bounced blocks are copied out here."""
        bb = self.block_bytes
        for s in parts:
            bounce = {id(d): b for b, d in s.bounce}
            if s.ok and s.trust and s.deadline is not None and s.done_at > s.deadline:
                # The lease may have lapsed mid-READ: the peer may have reused the
                # slots, so these bytes are not trusted.
                self.stats.lease_overruns += len(s.idx)
                s.ok = False
            for i, want in zip(s.idx, s.sums):
                if not s.ok or (s.length and s.off + s.length < bb):
                    continue  # failed, or not a block's last piece
                if not s.trust:
                    got = s.got.get(i)
                    if got is None:
                        continue  # a piece of it did not arrive
                    if not self._sum_matches(peer, keys[i], got, want):
                        bad.append(keys[i])
                        continue
                src = bounce.get(id(dst[i]))
                if src is not None:
                    np.copyto(dst[i], src)
                ok[i] = True
                self.stats.blocks_read += 1
                self.stats.bytes_read += bb
            self._free_bounce(s)

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

    def _locals(self, s: _Step, dst: Sequence[np.ndarray]) -> None:
        """The local descriptors of ``s`` (on the calling thread, before any lane READs:
        registering a region or taking a bounce buffer is not done on the lanes)."""
        s.local = []
        for i in s.idx:
            addr = self._local_addr(dst[i])
            if addr is None:
                buf = self._bounce()
                s.bounce.append((buf, dst[i]))
                addr = int(buf.ctypes.data)
                self.stats.bounce_blocks += 1
            if s.length:
                assert not s.bounce, "pieces are read into registered memory only"
                s.local.append((addr + s.off, s.length, 0))
            else:
                s.local.append((addr, self.block_bytes, 0))

    def _post(self, peer: Peer, s: _Step, lane: Lane) -> None:
        remote: list[tuple[int, int, int]] = s.handle
        s.handle = None
        assert peer.agent is not None, "a peer is posted to only while live"
        agent = lane.agent
        try:
            with lane.lock:
                ldesc = agent.get_xfer_descs(s.local, "DRAM")
                rdesc = agent.get_xfer_descs(remote, "DRAM")
                s.handle = agent.initialize_xfer("READ", ldesc, rdesc, peer.agent)
                state = agent.transfer(s.handle)
        except Exception as e:
            self.stats.transfer_errors += 1
            raise PeerError(f"peer {peer.addr}: NIXL READ could not start ({e})") from None
        if state == "ERR":
            self.stats.transfer_errors += 1
            raise PeerError(f"peer {peer.addr}: NIXL READ failed at post")

    def _wait(self, peer: Peer, s: _Step, lane: Lane) -> None:
        if s.handle is None:
            return
        start = time.monotonic()
        deadline = start + self.cfg.transfer_timeout_s
        asked = False
        while True:
            try:
                with lane.lock:
                    state = lane.agent.check_xfer_state(s.handle)
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
                self._cancel_or_drain(s, lane)
                raise PeerError(f"NIXL READ still running after {self.cfg.transfer_timeout_s}s")
            if not asked and time.monotonic() - start > _PUMP_AFTER_S:
                # Not done at once: the transport may need the peer to progress too
                # (the peer's poller runs after our hello and when asked, not always).
                # The calling thread holds the peer's lock while the lanes READ; the
                # lanes' pumps take turns on its socket.
                asked = True
                with self._pump_lock:
                    self._peers.send(peer, {"op": "pump"})
            if self.cfg.progress_thread:
                time.sleep(0.0001)  # NIXL's thread progresses the transfer

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

    def _cancel_or_drain(self, s: _Step, lane: Lane) -> None:
        """Stop a timed-out READ before its buffers can be reused.

        A READ that NIXL cannot cancel may still write into its destination later;
        the executor would by then have handed those staging buffers to another block.
        So if the cancel fails, wait until the transfer ends (UCX fails it when the
        peer is gone): a stall is better than bytes of one block landing in another.
        """
        h, s.handle = s.handle, None
        if h is None or isinstance(h, list):
            return
        err = self._release_xfer(h, lane)
        if err is None:
            return
        log.warning("kvbm tier %r: a timed-out NIXL READ cannot be cancelled (%s); "
                    "waiting for it to end before its buffers are reused", self.name, err)
        while True:
            with lane.lock:
                try:
                    state = lane.agent.check_xfer_state(h)
                except Exception:
                    state = "ERR"
            if state != "PROC":
                break
            time.sleep(0.001)
        with lane.lock, contextlib.suppress(Exception):
            lane.agent.release_xfer_handle(h)

    def _free_bounce(self, s: _Step) -> None:
        """Give a step's bounce buffers back for the next READ."""
        self._bounce_free.extend(b for b, _ in s.bounce)
        s.bounce = []

    def _release_handle(self, s: _Step, lane: Lane) -> None:
        h, s.handle = s.handle, None
        if h is None or isinstance(h, list):
            return
        err = self._release_xfer(h, lane)
        if err is not None:  # a transfer that cannot be cancelled stays with NIXL
            log.debug("kvbm remote: releasing a transfer handle failed (%s)", err)

    def _release_xfer(self, h: Any, lane: Lane) -> Exception | None:
        """Release a NIXL transfer handle; the error when NIXL refused (still running)."""
        with lane.lock:
            try:
                lane.agent.release_xfer_handle(h)
            except Exception as e:
                return e
        return None

    # -- local memory -----------------------------------------------------------
    def _local_addr(self, buf: np.ndarray) -> int | None:
        """The address of ``buf`` if it lies in NIXL-registered memory (registering its
        whole underlying allocation the first time), else None for the bounce path.

        Remembered per buffer object (held, so its id is not reused; a numpy array's
        address never changes, and a region stays registered until close): a buffer
        read again costs a dict lookup, not the walk to its allocation (4-6 us)."""
        hit_addr = self._addr_of.get(id(buf))
        if hit_addr is not None and hit_addr[0] is buf:
            return hit_addr[1]
        addr = self._resolve(buf)
        if addr is not None:
            if len(self._addr_of) >= _ADDR_CACHE_MAX:
                self._addr_of.clear()
            self._addr_of[id(buf)] = (buf, addr)
        return addr

    def _resolve(self, buf: np.ndarray) -> int | None:
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
        try:
            self._lanes.register(raddr, int(root.nbytes))
        except Exception as e:
            log.debug("kvbm remote: registering %d bytes with a read lane failed (%s)", root.nbytes, e)
            return None
        return addr

    def _bounce(self) -> np.ndarray:
        if self._bounce_free:
            return self._bounce_free.pop()
        buf = aligned_empty(self.block_bytes)
        with self._nixl_lock:
            reg = self._agent.register_memory([(int(buf.ctypes.data), buf.nbytes, 0, "")], "DRAM")
        self._regions[int(buf.ctypes.data)] = (buf.nbytes, buf, reg)
        self._lanes.register(int(buf.ctypes.data), buf.nbytes)
        return buf

    def close(self) -> None:
        """Deregister every local region and bounce buffer; stop the copy lanes."""
        self._lanes.close()
        self._addr_of.clear()
        with self._nixl_lock:
            for _, _, reg in self._regions.values():
                with contextlib.suppress(Exception):
                    self._agent.deregister_memory(reg)
            self._regions.clear()
        self._bounce_free.clear()
