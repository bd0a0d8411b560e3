"""The remote tier's peer set: who this instance reads from, and how to reach them.

Peers come from two places. The ``peers`` list names addresses; such a peer is made
live by a ``hello`` request, which returns its NIXL metadata and is refused when
its namespace or block size differs. A rendezvous (``rendezvous_dir`` or
``rendezvous_s3``, see ``rendezvous.py``) holds one record per serving instance:
``scan_dir`` lists it, parses the records that changed, ignores those whose
heartbeat is older than ``stale_intervals`` of the publisher's intervals (a killed
peer's leftover) and drops the peers whose record is gone (a clean shutdown). Such a
peer also publishes its served hashes, so a probe needs no request.

A peer that fails (gone, refused, a transfer error) is dropped: its socket and NIXL
agent are forgotten and it is tried again after ``retry_after_s`` (a restarted peer
comes back with a new NIXL agent). Requests to one peer go over one TCP connection,
serialised by the peer's lock.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .config import RemoteTierConfig
from .protocol import recv_msg, send_msg, send_msgs, split_addr
from .rendezvous import Rendezvous
from .server import Identity

log = logging.getLogger("kvbm.remote")

#: What a peer record must hold to be used (see ``RemoteTier._publish``).
_RECORD_KEYS = frozenset({"addr", "epoch", "metadata"})
#: How long a caller waits for another thread's first listing of the rendezvous.
_FIRST_LISTING_WAIT_S = 30.0


class PeerError(Exception):
    """A peer failed (gone, refused, wrong namespace): drop it for ``retry_after_s``."""


@dataclass
class Peer:
    """One configured peer and what this instance knows of it."""

    key: str
    addr: str
    instance_id: str = ""
    agent: str | None = None
    epoch: str = ""
    metadata: bytes = b""
    retry_at: float = 0.0
    sock: socket.socket | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    hashes: frozenset[bytes] = frozenset()
    file_stat: Hashable | None = None  # the stamp of its record when last parsed
    heartbeat: float = 0.0
    interval_s: float = 0.0
    hashes_sum: int | None = None
    from_dir: bool = False
    failures: int = 0

    @property
    def up(self) -> bool:
        """Whether the peer is live (its NIXL agent is loaded)."""
        return self.agent is not None


@dataclass
class RemoteStats:
    """Counters of the reading side (the peer set counts drops, the reader the rest)."""

    probes: int = 0
    blocks_read: int = 0
    bytes_read: int = 0
    lease_misses: int = 0
    checksum_failures: int = 0
    transfer_errors: int = 0
    peer_drops: int = 0
    bounce_blocks: int = 0
    lease_overruns: int = 0
    speculative_blocks: int = 0  # READ before their lease reply, from remembered addresses
    speculative_misses: int = 0  # of those, not where the reply put them (READ again or lost)


class PeerSet:
    """The peers of one remote tier: discovery, connections, drops and retries.

    ``agent`` is the tier's NIXL agent (each live peer's agent is loaded into it) and
    ``nixl_lock`` the lock every use of it takes; ``identity`` is this instance's
    (its id and address go with every request, its namespace and block size must
    match a peer's).
    """

    def __init__(self, name: str, cfg: RemoteTierConfig, agent: Any,
                 nixl_lock: threading.RLock, identity: Identity,
                 rdv: Rendezvous | None, stats: RemoteStats) -> None:
        self.name = name
        self.cfg = cfg
        self._agent = agent
        self._nixl_lock = nixl_lock
        self.identity = identity
        self._ns = identity.namespace
        self.block_bytes = identity.block_bytes
        self._rdv = rdv
        self.stats = stats
        # S3 is listed on this thread after the first time (see scan_dir).
        self._scanner = (ThreadPoolExecutor(1, thread_name_prefix=f"kvbm-{name}-scan")
                         if rdv is not None and rdv.remote else None)
        self._scan_lock = threading.Lock()
        self._scan_gate = threading.Lock()
        self._scan_queued = False
        self._scanned = False
        # Set once the first listing ended: a caller that comes while it runs waits for
        # it (the peers it finds) instead of going on with none.
        self._first_listed = threading.Event()
        self._peers: dict[str, Peer] = {f"addr:{a}": Peer(f"addr:{a}", a) for a in cfg.peers}
        self._peers_lock = threading.Lock()
        self._last_scan = 0.0
        # peer key -> (record stamp, when to parse it again) of leftovers found stale
        self._stale_files: dict[str, tuple[Hashable, float]] = {}
        self._closed = False
        # Loads published peers' agents off the probe's path (``connect_ahead``).
        self._connector: ThreadPoolExecutor | None = None
        self._connecting: set[str] = set()  # peer keys queued or loading there
        self._connect_gate = threading.Lock()

    def __len__(self) -> int:
        return len(self._peers)

    def describe(self) -> list[dict[str, Any]]:
        """The peer set: address, instance, whether live, failures so far."""
        with self._peers_lock:
            return [{"addr": p.addr, "id": p.instance_id, "up": p.up, "failures": p.failures}
                    for p in self._peers.values()]

    # -- discovery at the rendezvous --------------------------------------------
    def scan_dir(self, force: bool = False) -> None:
        """Pick up peers (and their served hashes) published at the rendezvous.

        A directory is listed here (a local ``scandir``). S3 is listed here the first
        time only, then on the scan thread: a slow or failing S3 never stalls a probe
        or a read, which go on with the peers of the last listing that worked.
        """
        rdv = self._rdv
        if rdv is None:
            return
        now = time.monotonic()
        if not force and now - self._last_scan < self.cfg.publish_interval_s / 2:
            if not self._first_listed.is_set():
                # Another thread's first listing is running: nothing is known before it.
                self._first_listed.wait(_FIRST_LISTING_WAIT_S)
            return
        self._last_scan = now
        if self._scanner is not None and self._scanned and not force:
            with self._scan_gate:
                if self._scan_queued:
                    return
                self._scan_queued = True
            try:
                self._scanner.submit(self._scan_queued_once, rdv)
            except RuntimeError:  # the tier is closing
                self._scan_queued = False
            return
        try:
            self._scan(rdv)
        finally:
            self._first_listed.set()

    def _scan_queued_once(self, rdv: Rendezvous) -> None:
        try:
            if not self._closed:
                self._scan(rdv)
        except Exception as e:  # a bug here must not kill the scan thread for good
            log.warning("kvbm tier %r: scanning %s failed (%s)", self.name, rdv.where, e)
        finally:
            with self._scan_gate:
                self._scan_queued = False

    def _scan(self, rdv: Rendezvous) -> None:
        """One listing of ``rdv``: add, update and drop the peers published there."""
        with self._scan_lock:
            self._scanned = True
            listing = rdv.listing()
            if listing is None:
                return  # logged by the rendezvous; keep the peers known so far
            now = time.monotonic()
            wall = time.time()
            seen: set[str] = set()
            for pid, stamp in listing.items():
                key = f"id:{pid}"
                with self._peers_lock:
                    peer = self._peers.get(key)
                if (peer is not None and peer.file_stat == stamp
                        and self._fresh(peer.heartbeat, peer.interval_s, wall)):
                    seen.add(key)
                    continue  # not rewritten since the last parse, and still fresh
                # (A record that looks stale is parsed again: on a file system with coarse
                # timestamps a rewrite can keep the same (mtime, size).)
                left = self._stale_files.get(key)
                if left is not None and left[0] == stamp and now < left[1]:
                    continue  # a leftover found stale: parse it again only now and then
                blob = rdv.fetch(pid)
                if blob is None:
                    if peer is not None and self._fresh(peer.heartbeat, peer.interval_s, wall):
                        seen.add(key)  # unreadable just now: keep what its last record said
                    continue
                try:
                    info = msgpack.unpackb(blob, raw=False)
                    if not isinstance(info, dict) or not info.keys() >= _RECORD_KEYS:
                        raise ValueError(f"not a peer record: it lacks {sorted(_RECORD_KEYS)}")
                except Exception as e:
                    log.warning("kvbm tier %r: unreadable peer record %s (%s)",
                                self.name, rdv.describe(pid), e)
                    continue
                if info.get("namespace") != self._ns or info.get("block_bytes") != self.block_bytes:
                    continue
                heartbeat = float(info.get("heartbeat", 0.0))
                interval_s = float(info.get("interval_s", 0.0))
                if not self._fresh(heartbeat, interval_s, wall):
                    # A killed peer leaves its record behind: connecting to it would fail
                    # every retry_after_s. Ignore it until it is rewritten.
                    if key not in self._stale_files:
                        log.info("kvbm tier %r: ignoring %s: its heartbeat is %.1fs old (the "
                                 "peer is gone; delete the record or restart the peer)",
                                 self.name, rdv.describe(pid), wall - heartbeat)
                    again = self.cfg.stale_intervals * max(interval_s, self.cfg.publish_interval_s)
                    self._stale_files[key] = (stamp, now + again)
                    continue
                self._stale_files.pop(key, None)
                seen.add(key)
                hashes_sum = info.get("hashes_sum")
                with self._peers_lock:
                    peer = self._peers.get(key)
                    if peer is None:
                        peer = self._peers[key] = Peer(key, str(info["addr"]), from_dir=True)
                with peer.lock:
                    if peer.epoch and peer.epoch != info["epoch"]:
                        # The peer restarted: its old agent and connection are gone.
                        self._forget_agent(peer)
                        peer.retry_at = 0.0
                    peer.addr = str(info["addr"])
                    peer.instance_id = pid
                    peer.epoch = str(info["epoch"])
                    peer.metadata = bytes(info["metadata"])
                    if hashes_sum is None or hashes_sum != peer.hashes_sum:
                        hashes: bytes = info.get("hashes", b"")
                        peer.hashes = frozenset(hashes[i : i + 16] for i in range(0, len(hashes), 16))
                        peer.hashes_sum = hashes_sum
                    peer.file_stat = stamp
                    peer.heartbeat = heartbeat
                    peer.interval_s = interval_s
            with self._peers_lock:
                # Peers whose record was removed (a clean shutdown) or went stale (killed).
                gone = [k for k, p in self._peers.items() if p.from_dir and k not in seen]
                dropped = [self._peers.pop(k) for k in gone]
            for key in list(self._stale_files):
                if key[3:] not in listing:
                    del self._stale_files[key]  # its record was deleted
        for peer in dropped:
            with peer.lock:
                self._forget_agent(peer)

    def _fresh(self, heartbeat: float, interval_s: float, wall: float) -> bool:
        """Whether a peer file's heartbeat is recent enough to trust the peer is alive."""
        if interval_s <= 0:
            return False  # no heartbeat: written by a version that cannot be judged
        return wall - heartbeat <= self.cfg.stale_intervals * interval_s

    # -- the live set -------------------------------------------------------------
    def live(self) -> list[Peer]:
        """The peers to ask now: those live, and those whose retry time has come and
        that connect (the others are dropped again)."""
        return self._to_ask(ahead=False)

    def probing(self) -> list[Peer]:
        """The peers a probe asks: those live, and those published at the rendezvous whose
        retry time has come, their agents loaded on the connect thread meanwhile
        (``connect_ahead``): a published peer's probe reads only the hashes it published,
        so it need not wait for the load (``add_remote_agent``: 10-15 ms alone, 0.4-0.5 s
        in ``kvbm bench --local remote`` while the engine's huge-page collapse ran). Its
        first read waits for the load (``live``); a load that fails drops the peer and
        the blocks the probe found there are misses. Configured peers connect here, as
        in ``live`` (their probe is a request)."""
        return self._to_ask(ahead=True)

    def _to_ask(self, ahead: bool) -> list[Peer]:
        """``live`` (every peer due connects here) or, with ``ahead``, ``probing``."""
        self.scan_dir()
        now = time.monotonic()
        with self._peers_lock:
            peers = list(self._peers.values())
        out, later = [], []
        for p in peers:
            if p.up:
                out.append(p)
            elif now < p.retry_at:
                continue
            elif ahead and p.from_dir:
                out.append(p)
                later.append(p)
            else:
                try:
                    with p.lock:
                        self._connect(p)
                    out.append(p)
                except PeerError as e:
                    self.drop(p, str(e))
        if later:
            self._connect_later(later)
        return out

    def connect_ahead(self) -> None:
        """List a ``rendezvous_dir`` and load the agents of the peers published there on
        the connect thread, now, before the first probe (the tier calls it when made).
        An S3 rendezvous is listed first by the first probe, as before (its later
        listings run on the scan thread; the peers it finds load on the connect thread)."""
        if self._rdv is None or self._rdv.remote:
            return
        self._submit(self._ahead)

    def _ahead(self) -> None:
        """One listing (not counted as the first or the last: the first probe lists
        again, so it sees the hashes published since) and the loads of the peers found."""
        rdv = self._rdv
        assert rdv is not None
        try:
            self._scan(rdv)
        except Exception as e:  # noqa: BLE001 - a probe lists again and says what failed
            log.debug("kvbm tier %r: listing ahead failed (%s)", self.name, e)
            return
        now = time.monotonic()
        with self._peers_lock:
            todo = [p for p in self._peers.values() if p.from_dir and not p.up and now >= p.retry_at]
        if todo:
            self._connect_later(todo)

    def _submit(self, fn: Any, *args: Any) -> bool:
        with self._connect_gate:
            if self._closed:
                return False
            if self._connector is None:
                self._connector = ThreadPoolExecutor(1, thread_name_prefix=f"kvbm-{self.name}-connect")
            try:
                self._connector.submit(fn, *args)
            except RuntimeError:  # shut down: the tier is closing
                return False
        return True

    def _connect_later(self, peers: list[Peer]) -> None:
        """Queue the loads of ``peers``' agents on the connect thread (once each)."""
        for p in peers:
            with self._connect_gate:
                if p.key in self._connecting:
                    continue
                self._connecting.add(p.key)
            if not self._submit(self._connect_one, p):
                with self._connect_gate:
                    self._connecting.discard(p.key)

    def _connect_one(self, p: Peer) -> None:
        try:
            with p.lock:
                if not self._closed and not p.up and time.monotonic() >= p.retry_at:
                    self._connect(p)
        except PeerError as e:
            self.drop(p, str(e))
        except Exception as e:  # noqa: BLE001 - a read connects again and says so
            log.debug("kvbm tier %r: loading peer %s ahead failed (%s)", self.name, p.addr, e)
        finally:
            with self._connect_gate:
                self._connecting.discard(p.key)

    def send(self, peer: Peer, *msgs: dict[str, Any]) -> None:
        """Send requests to ``peer`` in one write (caller holds ``peer.lock``); PeerError
        when it fails."""
        for msg in msgs:
            msg["from_id"] = self.identity.instance_id
            msg["from_addr"] = self.identity.addr
        try:
            if peer.sock is None:
                host, port = split_addr(peer.addr)
                s = socket.create_connection((host, port), timeout=self.cfg.request_timeout_s)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer.sock = s
            if len(msgs) == 1:
                send_msg(peer.sock, msgs[0])
            elif msgs:
                send_msgs(peer.sock, list(msgs))
        except (OSError, ConnectionError, ValueError) as e:
            ops = ", ".join(str(m["op"]) for m in msgs)
            raise PeerError(f"peer {peer.addr}: {ops} failed ({e})") from None

    def recv(self, peer: Peer, op: str) -> dict[str, Any]:
        """The reply to the oldest request in flight to ``peer``."""
        try:
            assert peer.sock is not None
            out = recv_msg(peer.sock)
        except (OSError, ConnectionError, ValueError, AssertionError) as e:
            raise PeerError(f"peer {peer.addr}: {op} failed ({e})") from None
        if not out.get("ok"):
            raise PeerError(f"peer {peer.addr} refused {op}: {out.get('error')}")
        return out

    def rpc(self, peer: Peer, msg: dict[str, Any], reply: bool = True) -> dict[str, Any]:
        """One request to ``peer`` and its reply (none for one-way ``release``)."""
        self.send(peer, msg)
        return self.recv(peer, str(msg["op"])) if reply else {}

    def _connect(self, peer: Peer) -> None:
        """Make ``peer`` live: learn its metadata (hello or its file) and load its agent."""
        if peer.up:
            return
        if not peer.from_dir:
            info = self.rpc(peer, {"op": "hello"})
            if info.get("namespace") != self._ns or info.get("block_bytes") != self.block_bytes:
                raise PeerError(
                    f"peer {peer.addr} serves namespace {info.get('namespace')} with "
                    f"{info.get('block_bytes')}-byte blocks, this tier needs {self._ns} with "
                    f"{self.block_bytes}; give both instances the same model, layout and TP rank"
                )
            peer.instance_id = str(info["id"])
            peer.epoch = str(info["epoch"])
            peer.metadata = bytes(info["metadata"])
        if not peer.metadata:
            raise PeerError(f"peer {peer.addr} published no NIXL metadata")
        try:
            with self._nixl_lock:
                peer.agent = self._agent.add_remote_agent(peer.metadata)
        except Exception as e:
            raise PeerError(f"peer {peer.addr}: loading its NIXL agent failed ({e})") from None

    def _forget_agent(self, peer: Peer) -> None:
        if peer.sock is not None:
            with contextlib.suppress(OSError):
                peer.sock.close()
            peer.sock = None
        if peer.agent is not None:
            with self._nixl_lock, contextlib.suppress(Exception):
                self._agent.remove_remote_agent(peer.agent)
            peer.agent = None

    def drop(self, peer: Peer, why: str) -> None:
        """Take ``peer`` out of the live set until ``retry_after_s`` passes."""
        with peer.lock:
            was_up = peer.up
            self._forget_agent(peer)
            peer.retry_at = time.monotonic() + self.cfg.retry_after_s
            peer.failures += 1
        self.stats.peer_drops += 1
        if was_up or peer.failures == 1:
            log.warning("kvbm tier %r: %s; peer dropped for %.1fs, its blocks are misses",
                        self.name, why, self.cfg.retry_after_s)

    def close(self) -> None:
        """Forget every peer's connection and agent; stop listing the rendezvous."""
        with self._connect_gate:
            self._closed = True
            conn, self._connector = self._connector, None
        if conn is not None:
            conn.shutdown(wait=True, cancel_futures=True)  # no agent loaded after this
        with self._peers_lock:
            peers = list(self._peers.values())
        for p in peers:
            with p.lock:
                self._forget_agent(p)
        if self._scanner is not None:
            self._scanner.shutdown(wait=False, cancel_futures=True)
