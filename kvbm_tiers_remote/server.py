"""The serving half of the remote tier: this instance's host tier, leased to peers.

A ``BlockServer`` answers the control-plane requests of ``protocol`` on one TCP
socket. Its NIXL agent has the served arena registered, so a peer that holds a lease
reads the block's bytes with a one-sided NIXL READ; this process only pins the block
(so it cannot be evicted and overwritten mid-read) and reports its address and xxh3
checksum. A lease ends when the reader releases it, when the reader's connection
closes, or after its timeout, so a dead or hung reader cannot pin blocks forever.

What is served comes from a ``kvbm.served.ServedBlocks`` source: the arena and which
key sits in which slot. The executor keeps one (``SlotMap``) from the writes and
discards it runs, in one process and in every vLLM worker alike: a slot is served
only after all its bytes were written, and a slot a peer holds a lease on is never
written (the executor skips that write and reports it failed).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import xxhash

from kvbm.hashing import SequenceHash
from kvbm.served import ServedBlocks

from .protocol import recv_msg, send_msg

log = logging.getLogger("kvbm.remote")

#: Seconds the serving side progresses NIXL after a reader connects or asks for it.
_PUMP_S = 1.0


@dataclass
class Identity:
    """Who this instance is to its peers."""

    instance_id: str
    addr: str
    epoch: str
    agent: str
    namespace: str
    block_bytes: int
    metadata: bytes = b""


@dataclass
class _Lease:
    deadline: float
    slots: list[int]
    conn: int


@dataclass
class ServerStats:
    """Counters of the serving side."""

    leases: int = 0
    leased_blocks: int = 0
    lease_misses: int = 0
    expired_leases: int = 0
    refused: int = 0


class BlockServer:
    """Serves the blocks of one ``ServedBlocks`` source to the peers that ``allowed`` accepts."""

    def __init__(
        self,
        source: ServedBlocks,
        identity: Identity,
        listener: socket.socket,
        allowed: Callable[[str, str], bool],
        max_ttl_s: float,
        progress: Callable[[], None] | None = None,
        checksum_cache: bool = True,
    ) -> None:
        self.source = source
        slots = source.slots
        self._slots = slots
        self._base = int(slots.ctypes.data)
        self._bb = int(slots.shape[1])
        self.identity = identity
        self._listener = listener
        self._allowed = allowed
        self._max_ttl = max_ttl_s
        self._leases: dict[int, _Lease] = {}
        # slot -> (key, version, xxh3) of the bytes the slot held when first leased.
        self._sums: dict[int, tuple[bytes, int, int]] | None = {} if checksum_cache else None
        self._lease_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self._conns: dict[int, socket.socket] = {}
        self._stop = threading.Event()
        self.stats = ServerStats()
        self._progress = progress
        self._pump_until = 0.0
        self._pump_wake = threading.Event()
        self._threads = [
            threading.Thread(target=self._accept_loop, name="kvbm-remote-accept", daemon=True),
            threading.Thread(target=self._reaper, name="kvbm-remote-leases", daemon=True),
        ]
        if progress is not None:
            self._threads.append(
                threading.Thread(target=self._pump, name="kvbm-remote-progress", daemon=True)
            )
        for t in self._threads:
            t.start()

    # -- connections ------------------------------------------------------------
    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cid = next(self._conn_ids)
            self._conns[cid] = sock
            threading.Thread(
                target=self._serve_conn, args=(cid, sock), name=f"kvbm-remote-conn{cid}", daemon=True
            ).start()

    def _serve_conn(self, cid: int, sock: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                try:
                    msg = recv_msg(sock)
                except (ConnectionError, OSError):
                    return
                reply = self._handle(cid, msg)
                if reply is not None:
                    send_msg(sock, reply)
        except (ConnectionError, OSError):
            pass
        except Exception:  # a bug here must not take the engine down; the reader sees a miss
            log.exception("kvbm remote: serving connection %d failed", cid)
        finally:
            self._conns.pop(cid, None)
            sock.close()
            # A reader that went away cannot release its leases: drop them now.
            self._release_where(lambda lease: lease.conn == cid)

    def _handle(self, cid: int, msg: dict[str, Any]) -> dict[str, Any] | None:
        op = msg.get("op")
        if op == "release":
            self._release(cid, int(msg.get("lease", 0)))
            return None
        from_id, from_addr = str(msg.get("from_id", "")), str(msg.get("from_addr", ""))
        allowed = self._allowed(from_id, from_addr)
        if allowed and self._progress is not None and op in ("hello", "pump"):
            # A reader connects (UCX wires up its endpoint with this side's help), or
            # its READ waits on a transport that needs this side to progress: keep the
            # NIXL worker progressing for a while. Not on every lease: on shared-memory
            # and RDMA transports a READ needs nothing from this side, and a poller
            # woken per request cost the lease reply ~0.1 ms and the reader's copy CPU.
            self._pump_until = time.monotonic() + _PUMP_S
            self._pump_wake.set()
        if op == "pump":  # one-way
            return None
        if op == "suspect":  # one-way, like release
            if allowed:
                self._forget_sums(msg.get("keys") or [])
            return None
        if not allowed:
            self.stats.refused += 1
            return {"ok": False, "error": (
                f"instance {self.identity.instance_id!r} does not serve {from_id!r} at "
                f"{from_addr!r}: add that address to its 'peers' or publish in its rendezvous (rendezvous_dir or rendezvous_s3)"
            )}
        if op == "hello":
            ident = self.identity
            return {"ok": True, "id": ident.instance_id, "agent": ident.agent,
                    "metadata": ident.metadata, "epoch": ident.epoch,
                    "namespace": ident.namespace, "block_bytes": ident.block_bytes}
        if op == "probe":
            return {"ok": True, "found": self.source.probe(msg.get("keys") or [])}
        if op == "lease":
            return self._lease(cid, msg.get("keys") or [], float(msg.get("ttl", self._max_ttl)))
        return {"ok": False, "error": f"unknown op {op!r}"}

    # -- leases -----------------------------------------------------------------
    def _lease(self, cid: int, keys: list[SequenceHash], ttl: float) -> dict[str, Any]:
        got = self.source.pin(keys)
        pinned = [g[0] for g in got if g is not None]
        ttl = min(max(ttl, 0.01), self._max_ttl)
        with self._lease_lock:
            lease_id = next(self._ids)
            self._leases[lease_id] = _Lease(time.monotonic() + ttl, pinned, cid)
        blocks: list[list[int] | None] = []
        bb, base, arr, sums = self._bb, self._base, self._slots, self._sums
        for k, g in zip(keys, got):
            if g is None:
                blocks.append(None)
                continue
            s, version = g
            # The checksum is taken under the pin, at the slot's first lease under this
            # key and version: the pin keeps the bytes so until the lease ends. A
            # remembered sum that went stale (a source without versions, the slot
            # rewritten under the same key) can only make the reader's check fail, a
            # miss, never pass wrong bytes; it then says "suspect" and the sum is
            # taken again.
            c = sums.get(s) if sums is not None else None
            if c is not None and c[0] == k and c[1] == version:
                h = c[2]
            else:
                h = xxhash.xxh3_64_intdigest(arr[s])
                if sums is not None:
                    sums[s] = (k, version, h)
            blocks.append([base + s * bb, h])
        st = self.stats
        st.leases += 1
        st.leased_blocks += len(pinned)
        st.lease_misses += len(got) - len(pinned)
        # The granted ttl: a reader that skips checksums ('verify: lease') trusts only
        # the bytes its READ finished moving before the lease could have expired.
        return {"ok": True, "lease": lease_id, "blocks": blocks, "ttl": ttl}

    def _release(self, cid: int, lease_id: int) -> None:
        with self._lease_lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.conn != cid:
                return  # only the connection that took a lease may end it
            del self._leases[lease_id]
        self._unpin(lease.slots)

    def _forget_sums(self, keys: list[SequenceHash]) -> None:
        if self._sums is None:
            return
        bad = set(keys)
        for s, c in list(self._sums.items()):
            if c[0] in bad:
                self._sums.pop(s, None)

    def _unpin(self, slots: list[int]) -> None:
        if slots:
            self.source.unpin(slots)

    def _release_where(self, pred: Callable[[_Lease], bool]) -> int:
        with self._lease_lock:
            gone = [k for k, v in self._leases.items() if pred(v)]
            leases = [self._leases.pop(k) for k in gone]
        for lease in leases:
            self._unpin(lease.slots)
        return len(leases)

    def _reaper(self) -> None:
        period = min(0.5, self._max_ttl / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            def expired(lease: _Lease, now: float = now) -> bool:
                return lease.deadline <= now

            n = self._release_where(expired)
            if n:
                self.stats.expired_leases += n
                log.warning("kvbm remote: %d leases timed out; their blocks are unpinned", n)

    def _pump(self) -> None:
        """Progress the NIXL worker while readers are active, and sleep otherwise.

        Without NIXL's own progress thread (which polls a core even when idle), the
        serving side must still progress UCX for a reader's connection set-up and for
        transports that need the target's help (a reader asks with ``pump`` when a
        READ does not complete at once); one-sided reads need nothing more.
        """
        assert self._progress is not None
        while not self._stop.is_set():
            self._pump_wake.wait(1.0)
            self._pump_wake.clear()
            while not self._stop.is_set() and time.monotonic() < self._pump_until:
                try:
                    self._progress()
                except Exception as e:
                    log.debug("kvbm remote: progress failed (%s)", e)
                time.sleep(0.0005)

    @property
    def active_leases(self) -> int:
        with self._lease_lock:
            return len(self._leases)

    def close(self) -> None:
        """Stop serving and drop every lease."""
        self._stop.set()
        self._pump_wake.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in list(self._conns.values()):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=2)
        self._release_where(lambda lease: True)
