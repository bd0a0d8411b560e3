"""The remote tier: blocks in the host tiers of peer instances, read over NIXL.

Reading. ``probe`` asks the live peers which keys they hold (a ``probe`` request in
``peers`` mode; the hash lists they publish in ``rendezvous_dir`` or ``rendezvous_s3``
mode, see ``rendezvous.py``) and remembers who holds what. ``read`` then, per peer
and in pipelined steps of ``pipeline_bytes``:
leases the blocks (the peer pins them and reports each block's address and xxh3),
posts one NIXL READ straight from the peer's arena into the destination buffers,
verifies each block's xxh3, and releases the lease. While step *i* transfers, step
*i+1* is leased and step *i-1* verified, so the control plane and checksums hide
behind the transfer. A block the peer lost, a checksum mismatch, a transfer error or
timeout is a failed block (``False``), never data; a peer that fails is dropped from
the peer set and tried again after ``retry_after_s`` (a restarted peer comes back
with a new NIXL agent).

Serving. The executor hands ``serve`` the slot map it keeps of the tier served (the
first tier above with a ``peer_arena()``, or ``serve_tier``): the arena is registered
with this tier's NIXL agent and a ``BlockServer`` starts on ``listen``; with a rendezvous (a directory or an S3 prefix) it also publishes this
instance's metadata, address and served hashes there, with a heartbeat rewritten
every ``publish_interval_s``. Readers ignore a record whose heartbeat is older than
``stale_intervals`` of the publisher's intervals (a killed peer's leftover, which
would otherwise cost a failed connect every ``retry_after_s``); a clean shutdown
removes the record. Only configured peers are served.

Place: last in the chain. The tier takes no offloads, so in a write-through chain
every tier below it would never receive a block; ``check_chain`` refuses that chain.

The remote tier stores nothing: its ``read_only`` admission rejects every offload,
and its registry only records which peer blocks this instance adopted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack
import numpy as np
import xxhash

from kvbm.errors import ConfigError
from kvbm.hashing import SequenceHash
from kvbm.layout import aligned_empty
from kvbm.tier import Tier, TierContext

from .config import RemoteTierConfig
from .protocol import recv_msg, send_msg, send_msgs, split_addr
from .rendezvous import DirectoryRendezvous, Rendezvous, open_rendezvous
from .server import BlockServer, Identity

if TYPE_CHECKING:
    from kvbm.config import TierConfig
    from kvbm.served import ServedBlocks

log = logging.getLogger("kvbm.remote")

#: What a peer record must hold to be used (see ``_publish``).
_RECORD_KEYS = frozenset({"addr", "epoch", "metadata"})
#: Local destination regions registered with NIXL, at most; beyond, reads go
#: through a registered bounce buffer and one extra copy.
_MAX_REGIONS = 256
#: Lease requests in flight to one peer while this side copies (bounded, so that
#: neither side's socket buffer can fill with requests the other is not reading).
_LEASE_WINDOW = 3
#: A READ still running after this long asks the peer to progress its NIXL worker.
_PUMP_AFTER_S = 0.002


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
        return self.agent is not None


@dataclass
class RemoteStats:
    """Counters of the reading side."""

    probes: int = 0
    blocks_read: int = 0
    bytes_read: int = 0
    lease_misses: int = 0
    checksum_failures: int = 0
    transfer_errors: int = 0
    peer_drops: int = 0
    bounce_blocks: int = 0
    lease_overruns: int = 0


class _Step:
    """One pipelined step: a lease, its READ and the blocks it covers."""

    __slots__ = ("idx", "lease", "sums", "handle", "bounce", "ok", "deadline")

    def __init__(self) -> None:
        self.idx: list[int] = []
        self.lease = 0
        self.sums: list[int] = []
        self.handle: Any = None
        self.bounce: list[tuple[np.ndarray, np.ndarray]] = []
        self.ok = False
        # Until when the lease surely pins the blocks (this side's monotonic clock);
        # None when the peer did not say its ttl.
        self.deadline: float | None = None


class RemoteTier(Tier):
    """Peers' host tiers over NIXL; also serves this instance's host tier to them."""

    kind: ClassVar[str] = "remote"
    medium: ClassVar[str] = "REMOTE"
    shared: ClassVar[bool] = True
    serves_peers: ClassVar[bool] = True
    default_admission: ClassVar[str] = "read_only"

    @classmethod
    def config_for_rank(cls, config: TierConfig, rank: int, tp_size: int) -> TierConfig:
        """Rank ``rank``'s config: its own server, reading its peers' rank ``rank``.

        Each rank serves only its own shard, so a rank-``r`` reader must reach rank-``r``
        servers. With ``peers``, rank ``r`` listens on ``listen``'s port + ``r`` and reads
        each peer at that peer's port + ``r`` (every instance uses the same convention,
        so ``peers`` and ``listen`` name rank 0's ports); a ``rendezvous_dir`` is already
        per rank (its folder is named by the namespace, which holds the rank). A reader
        that still reaches another rank's server is refused by ``hello``'s namespace check.
        """
        cfg: Any = config

        def shifted(addr: str, key: str) -> str:
            host, _, port = addr.rpartition(":")
            p = int(port)
            if p == 0:
                return addr  # any free port: found through the rendezvous
            if p + rank > 65535:
                raise ConfigError(
                    f"remote tier key {key!r}: {addr} + tensor-parallel rank {rank} is past "
                    f"port 65535; rank r uses port + r, so choose a port below {65536 - tp_size}"
                )
            return f"{host}:{p + rank}"

        update: dict[str, Any] = {"listen": shifted(cfg.listen, "listen"),
                                  "peers": [shifted(a, "peers") for a in cfg.peers]}
        if cfg.instance_id:
            update["instance_id"] = f"{cfg.instance_id}-rank{rank}"
        return config.model_copy(update=update)  # type: ignore[no-any-return]

    @classmethod
    def check_chain(cls, index: int, chain: Sequence[tuple[str, type[Tier]]],
                    write_through: bool) -> None:
        """Refuse a write-through chain with tiers below a remote tier; warn without one.

        A remote tier takes no offloads (``read_only``), and the cascade copies tier *i*
        to tier *i+1* only: every tier below it would never receive a block from this
        instance. Without write-through nothing cascades; only the lookup order changes
        (the network before local tiers), which is worth a warning.
        """
        if index == len(chain) - 1:
            return
        name = chain[index][0]
        below = ", ".join(repr(n) for n, _ in chain[index + 1:])
        if write_through:
            raise ConfigError(
                f"tier {name!r}: a remote tier takes no offloads, so the write-through "
                f"cascade stops at it and tier(s) {below} below it would never receive a "
                f"block; move {name!r} to the end of 'tiers'"
            )
        log.warning("kvbm tier %r: a remote tier is looked up before tier(s) %s below it, "
                    "which are local; move %r to the end of 'tiers'", name, below, name)

    def served_tier(self, candidates: Sequence[str]) -> str | None:
        """The tier named by ``serve_tier``, else the first with an arena; None if not serving."""
        if not self.cfg.serve:
            return None
        if self.cfg.serve_tier is not None:
            if self.cfg.serve_tier in candidates:
                return self.cfg.serve_tier
            log.warning("kvbm tier %r: serve_tier %r is not a tier whose memory peers can read "
                        "(%s); nothing is served", self.name, self.cfg.serve_tier,
                        ", ".join(candidates) or "none in this chain")
            return None
        if not candidates:
            log.warning("kvbm tier %r: serve is on but the chain has no host tier to expose; "
                        "add {type: host} above it or set serve: false", self.name)
            return None
        return candidates[0]

    def __init__(self, config: RemoteTierConfig, ctx: TierContext) -> None:
        super().__init__(config, ctx)
        self.cfg = config
        from nixl._api import nixl_agent, nixl_agent_config

        # UCX reads its environment when the backend is created: set it first.
        if config.ucx_net_devices:
            os.environ["UCX_NET_DEVICES"] = config.ucx_net_devices
        if config.ucx_tls:
            os.environ["UCX_TLS"] = config.ucx_tls
        self.epoch = secrets.token_hex(6)
        self.instance_id = config.instance_id or f"{socket.gethostname()}-{os.getpid()}-{self.epoch[:4]}"
        self._ns = ctx.namespace.hex
        self._nixl_lock = threading.RLock()
        agent_name = f"kvbm-{self.instance_id}-{self.epoch}"
        self._agent = nixl_agent(
            agent_name, nixl_agent_config(enable_prog_thread=config.progress_thread, backends=[])
        )
        opts = {}
        if config.ucx_error_handling_mode:
            opts["ucx_error_handling_mode"] = config.ucx_error_handling_mode
        self._agent.create_backend("UCX", opts)
        self._listener: socket.socket | None = None
        addr = config.listen
        if config.serve:
            host, port = split_addr(config.listen)
            lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                lst.bind((host, port))
            except OSError as e:
                lst.close()
                raise ConfigError(
                    f"tier {self.name!r}: key 'listen': cannot bind {config.listen} ({e.strerror}); "
                    "choose a free port or 0"
                ) from None
            lst.listen(64)
            self._listener = lst
            addr = f"{host}:{lst.getsockname()[1]}"
        self.identity = Identity(self.instance_id, addr, self.epoch, agent_name, self._ns,
                                 self.block_bytes)
        try:
            self._rdv: Rendezvous | None = open_rendezvous(config, self.name, self._ns,
                                                           self.instance_id)
        except Exception:
            if self._listener is not None:
                self._listener.close()
            raise
        # S3 is listed on this thread after the first time (see _scan_dir).
        self._scanner = (ThreadPoolExecutor(1, thread_name_prefix=f"kvbm-{self.name}-scan")
                         if self._rdv is not None and self._rdv.remote else None)
        self._scan_lock = threading.Lock()
        self._scan_gate = threading.Lock()
        self._scan_queued = False
        self._scanned = False
        self._peer_addrs = frozenset(config.peers)
        self._peers: dict[str, Peer] = {f"addr:{a}": Peer(f"addr:{a}", a) for a in config.peers}
        self._peers_lock = threading.Lock()
        self._last_scan = 0.0
        # peer key -> (record stamp, when to parse it again) of leftovers found stale
        self._stale_files: dict[str, tuple[Hashable, float]] = {}
        self._where: OrderedDict[bytes, str] = OrderedDict()
        self._where_lock = threading.Lock()
        self._regions: dict[int, tuple[int, np.ndarray, Any]] = {}
        self._bounce_free: list[np.ndarray] = []
        self._step_blocks = max(1, config.pipeline_bytes // self.block_bytes)
        self._part_blocks = max(1, config.verify_bytes // self.block_bytes)
        # Checksums of each READ run here while the next is read (xxhash releases the GIL).
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix=f"kvbm-{self.name}-verify")
        self.stats_r = RemoteStats()
        self._server: BlockServer | None = None
        self._served_reg: Any = None
        self._publisher: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False

    # -- serving ----------------------------------------------------------------
    def _progress(self) -> None:
        with self._nixl_lock:
            self._agent.get_new_notifs()  # drives the UCX worker's progress

    def serve(self, source: ServedBlocks) -> bool:
        """Expose ``source``'s arena to the configured peers.

        ``source`` (the executor's ``SlotMap`` of the served tier, in one process and in
        every vLLM worker alike) says which key sits in which slot and takes the
        leases' pins. Publishes in the rendezvous, if any. Returns False when ``serve``
        is off or this tier serves already.
        """
        if not self.cfg.serve or self._listener is None or self._server is not None:
            return False
        arena = source.slots
        with self._nixl_lock:
            self._served_reg = self._agent.register_memory(
                [(int(arena.ctypes.data), int(arena.nbytes), 0, "")], "DRAM"
            )
            # Metadata taken after registration carries the arena's remote keys.
            self.identity.metadata = self._agent.get_agent_metadata()
        self._server = BlockServer(
            source, self.identity, self._listener, self._allowed, self.cfg.lease_timeout_s,
            progress=None if self.cfg.progress_thread else self._progress,
            checksum_cache=self.cfg.checksum_cache,
        )
        if self._rdv is not None:
            self._publish()
            self._publisher = threading.Thread(
                target=self._publish_loop, name="kvbm-remote-publish", daemon=True
            )
            self._publisher.start()
        log.info("kvbm tier %r: serving %d slots as %s on %s", self.name,
                 int(arena.shape[0]), self.instance_id, self.identity.addr)
        return True

    def _allowed(self, from_id: str, from_addr: str) -> bool:
        if from_addr in self._peer_addrs:
            return True
        if self._rdv is not None:
            # A reader that publishes at the same rendezvous (S3: among the last listed).
            return self._rdv.knows(from_id)
        return False

    def _file(self) -> Path:
        assert isinstance(self._rdv, DirectoryRendezvous), "only rendezvous_dir has a file"
        return self._rdv.path

    def _publish(self, keys: bytes | None = None) -> None:
        if keys is None:
            keys = self._server.source.keys() if self._server is not None else b""
        ident = self.identity
        # "heartbeat" (wall clock: readers may be other hosts on a shared directory)
        # is rewritten every interval, so a reader can tell a killed peer's leftover
        # file from a live one; "hashes_sum" lets readers skip re-parsing unchanged keys.
        blob = msgpack.packb({
            "id": ident.instance_id, "addr": ident.addr, "agent": ident.agent,
            "epoch": ident.epoch, "metadata": ident.metadata, "namespace": ident.namespace,
            "block_bytes": ident.block_bytes, "pid": os.getpid(), "hashes": keys,
            "hashes_sum": xxhash.xxh3_64_intdigest(keys), "heartbeat": time.time(),
            "interval_s": self.cfg.publish_interval_s,
        }, use_bin_type=True)
        assert self._rdv is not None, "publishing needs a rendezvous"
        self._rdv.publish(blob)  # a failure is logged there (once per outage)

    def _publish_loop(self) -> None:
        while not self._stop.wait(self.cfg.publish_interval_s):
            try:
                # Rewritten even when the keys did not change: the file's heartbeat is
                # what tells readers this instance is still alive.
                self._publish()
            except Exception as e:  # a full disk or a failing S3 must not stop the engine
                where = self._rdv.where if self._rdv is not None else "?"
                log.warning("kvbm tier %r: publishing to %s failed (%s)", self.name, where, e)

    def detach(self) -> None:
        """Stop serving: unpublish, close the server, drop every lease it granted."""
        self._stop.set()
        if self._publisher is not None:
            self._publisher.join(timeout=2)
            self._publisher = None
        if self._rdv is not None and self._server is not None:
            self._rdv.unpublish()
        if self._server is not None:
            self._server.close()
            self._server = None
        elif self._listener is not None:
            self._listener.close()
        self._listener = None
        if self._served_reg is not None:
            with self._nixl_lock:
                try:
                    self._agent.deregister_memory(self._served_reg)
                except Exception as e:
                    log.warning("kvbm tier %r: deregistering the served arena failed (%s)", self.name, e)
            self._served_reg = None

    # -- peers ------------------------------------------------------------------
    def _scan_dir(self, force: bool = False) -> None:
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
        self._scan(rdv)

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

    def _live_peers(self) -> list[Peer]:
        self._scan_dir()
        now = time.monotonic()
        with self._peers_lock:
            peers = list(self._peers.values())
        out = []
        for p in peers:
            if p.up:
                out.append(p)
            elif now >= p.retry_at:
                try:
                    with p.lock:
                        self._connect(p)
                    out.append(p)
                except PeerError as e:
                    self._drop(p, str(e))
        return out

    def _send(self, peer: Peer, *msgs: dict[str, Any]) -> None:
        """Send requests to ``peer`` in one write (caller holds ``peer.lock``); PeerError
        when it fails."""
        for msg in msgs:
            msg["from_id"] = self.instance_id
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

    def _recv(self, peer: Peer, op: str) -> dict[str, Any]:
        """The reply to the oldest request in flight to ``peer``."""
        try:
            assert peer.sock is not None
            out = recv_msg(peer.sock)
        except (OSError, ConnectionError, ValueError, AssertionError) as e:
            raise PeerError(f"peer {peer.addr}: {op} failed ({e})") from None
        if not out.get("ok"):
            raise PeerError(f"peer {peer.addr} refused {op}: {out.get('error')}")
        return out

    def _rpc(self, peer: Peer, msg: dict[str, Any], reply: bool = True) -> dict[str, Any]:
        """One request to ``peer`` and its reply (none for one-way ``release``)."""
        self._send(peer, msg)
        return self._recv(peer, str(msg["op"])) if reply else {}

    def _connect(self, peer: Peer) -> None:
        """Make ``peer`` live: learn its metadata (hello or its file) and load its agent."""
        if peer.up:
            return
        if not peer.from_dir:
            info = self._rpc(peer, {"op": "hello"})
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

    def _drop(self, peer: Peer, why: str) -> None:
        """Take ``peer`` out of the live set until ``retry_after_s`` passes."""
        with peer.lock:
            was_up = peer.up
            self._forget_agent(peer)
            peer.retry_at = time.monotonic() + self.cfg.retry_after_s
            peer.failures += 1
        self.stats_r.peer_drops += 1
        if was_up or peer.failures == 1:
            log.warning("kvbm tier %r: %s; peer dropped for %.1fs, its blocks are misses",
                        self.name, why, self.cfg.retry_after_s)

    # -- Tier contract ----------------------------------------------------------
    def probe(self, keys: Sequence[SequenceHash]) -> list[bool]:
        self.stats_r.probes += 1
        found = [False] * len(keys)
        for peer in self._live_peers():
            todo = [i for i, f in enumerate(found) if not f]
            if not todo:
                break
            if peer.from_dir:
                have = peer.hashes
                hits = [i for i in todo if keys[i] in have]
            else:
                try:
                    with peer.lock:
                        reply = self._rpc(peer, {"op": "probe", "keys": [keys[i] for i in todo]})
                except PeerError as e:
                    self._drop(peer, str(e))
                    continue
                hits = [i for i, f in zip(todo, reply.get("found", [])) if f]
            for i in hits:
                found[i] = True
                self._remember(keys[i], peer.key)
        return found

    def _remember(self, key: bytes, peer_key: str) -> None:
        w = self._where
        with self._where_lock:
            w[key] = peer_key
            w.move_to_end(key)
            # Found-but-never-adopted keys would pile up: keep a bounded memory.
            while len(w) > 4 * self.num_slots:
                w.popitem(last=False)

    def write(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> list[bool]:
        # Peers fill this tier; its 'read_only' admission keeps offloads away.
        return [False] * len(slots)

    def discard(self, slots: Sequence[int], keys: Sequence[SequenceHash]) -> None:
        for k in keys:
            self._where.pop(k, None)

    def read(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], dst: Sequence[np.ndarray]
    ) -> list[bool]:
        n = len(keys)
        ok = [False] * n
        if n == 0:
            return ok
        peers = {p.key: p for p in self._live_peers()}
        lost = [i for i in range(n) if self._where.get(keys[i]) not in peers]
        if lost:
            # Adopted a while ago, or its peer restarted: ask again who holds it.
            self.probe([keys[i] for i in lost])
            peers = {p.key: p for p in self._live_peers()}
        groups: dict[str, list[int]] = {}
        for i in range(n):
            pk = self._where.get(keys[i])
            if pk in peers:
                groups.setdefault(pk, []).append(i)
        for pk, idx in groups.items():
            self._read_from(peers[pk], idx, keys, dst, ok)
        failed = [keys[i] for i in range(n) if not ok[i]]
        if failed:
            # The planner drops a block whose read failed once nobody pins it; here
            # only forget where it was, so a later probe asks again.
            with self._where_lock:
                for k in failed:
                    self._where.pop(k, None)
        return ok

    # -- the data path ----------------------------------------------------------
    def _read_from(
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
        """
        first = min(len(idx), self._part_blocks)
        chunks = [idx[:first]]
        chunks += [idx[i : i + self._step_blocks] for i in range(first, len(idx), self._step_blocks)]
        verifying: list[Future[None]] = []
        cur: _Step | None = None
        part: _Step | None = None
        bad: list[bytes] = []
        sent_at: list[float] = []  # when each lease request was sent (replies come in order)
        by_lease = self.cfg.verify == "lease"
        try:
            with peer.lock:
                # Leases ask for their steps up to the window ahead, releases wait for
                # the next write: a 2-step batch costs the peer two reads, not four.
                releases: list[dict[str, Any]] = []
                for j in range(len(chunks)):
                    msgs: list[dict[str, Any]] = []
                    now = time.monotonic()
                    while len(sent_at) < len(chunks) and len(sent_at) - j <= _LEASE_WINDOW:
                        msgs.append(self._lease_msg(chunks[len(sent_at)], keys))
                        sent_at.append(now)
                    if msgs:
                        self._send(peer, *releases, *msgs)
                        releases = []
                    cur = self._leased(peer, chunks[j], sent_at[j])
                    for part in self._parts(cur):
                        self._post(peer, part, dst)
                        self._wait(peer, part)
                        self._release_handle(part)
                        check = True
                        if by_lease and part.deadline is not None:
                            if time.monotonic() > part.deadline:
                                # The lease may have lapsed mid-READ: the peer may have
                                # reused the slots, so these bytes are not trusted.
                                self.stats_r.lease_overruns += len(part.idx)
                                part.ok = False
                            check = False
                        if not check and not part.bounce:
                            self._accept(part, ok)
                        else:
                            verifying.append(self._verifier.submit(
                                self._verify, peer, part, keys, dst, ok, bad, check
                            ))
                    part = None
                    releases.append({"op": "release", "lease": cur.lease})
                    cur = None
                if releases:
                    self._send(peer, *releases)
                for f in verifying:
                    f.result()
                if bad:
                    # The peer's remembered checksums for these blocks may be stale
                    # (a slot rewritten under the same key): it recomputes them.
                    self._send(peer, {"op": "suspect", "keys": bad})
        except PeerError as e:
            for s in (part, cur):
                if s is not None:
                    self._abandon(s)
            # Leases granted but never received expire on the peer after their ttl,
            # or at once when the connection closes (dropping the peer closes it).
            self._drop(peer, str(e))
        finally:
            for f in verifying:
                f.result()

    def _parts(self, s: _Step) -> list[_Step]:
        """Split a leased step into READs of ``verify_bytes`` (they share its lease).

        Only for checksums, which want the bytes still cached; with ``verify: lease``
        one READ per step does, and costs fewer posts."""
        k = self._part_blocks
        if len(s.idx) <= k or self.cfg.verify != "checksum":
            return [s]
        remote: list[tuple[int, int, int]] = s.handle
        parts = []
        for a in range(0, len(s.idx), k):
            p = _Step()
            p.idx, p.sums, p.handle = s.idx[a : a + k], s.sums[a : a + k], remote[a : a + k]
            p.lease, p.deadline = s.lease, s.deadline
            parts.append(p)
        s.handle = None
        return parts

    def _lease_msg(self, chunk: list[int], keys: Sequence[SequenceHash]) -> dict[str, Any]:
        return {"op": "lease", "keys": [keys[i] for i in chunk], "ttl": self.cfg.lease_timeout_s}

    def _leased(self, peer: Peer, chunk: list[int], sent_at: float) -> _Step:
        """Receive the reply to the lease request for ``chunk`` sent at ``sent_at``."""
        reply = self._recv(peer, "lease")
        s = _Step()
        s.lease = int(reply["lease"])
        ttl = reply.get("ttl")
        if isinstance(ttl, (int, float)) and ttl > 0:
            # The peer started the lease after this side sent the request, so it
            # lasts at least until sent_at + ttl; the margin covers clock-rate skew.
            s.deadline = sent_at + ttl * 0.99 - 0.002
        remote: list[tuple[int, int, int]] = []
        for i, b in zip(chunk, reply["blocks"]):
            if b is None:
                self.stats_r.lease_misses += 1
                continue
            s.idx.append(i)
            s.sums.append(int(b[1]))
            remote.append((int(b[0]), self.block_bytes, 0))
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
                self.stats_r.bounce_blocks += 1
            local.append((addr, self.block_bytes, 0))
        assert peer.agent is not None, "a peer is posted to only while live"
        try:
            with self._nixl_lock:
                ldesc = self._agent.get_xfer_descs(local, "DRAM")
                rdesc = self._agent.get_xfer_descs(remote, "DRAM")
                s.handle = self._agent.initialize_xfer("READ", ldesc, rdesc, peer.agent)
                state = self._agent.transfer(s.handle)
        except Exception as e:
            self.stats_r.transfer_errors += 1
            self._abandon(s)
            raise PeerError(f"peer {peer.addr}: NIXL READ could not start ({e})") from None
        if state == "ERR":
            self.stats_r.transfer_errors += 1
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
                self.stats_r.transfer_errors += 1
                raise PeerError(f"NIXL READ failed: {state}")
            if time.monotonic() > deadline:
                self.stats_r.transfer_errors += 1
                self._cancel_or_drain(s)
                raise PeerError(f"NIXL READ still running after {self.cfg.transfer_timeout_s}s")
            if not asked and time.monotonic() - start > _PUMP_AFTER_S:
                # Not done at once: the transport may need the peer to progress too
                # (the peer's poller runs after our hello and when asked, not always).
                asked = True
                self._send(peer, {"op": "pump"})
            if self.cfg.progress_thread:
                time.sleep(0.0001)  # NIXL's thread progresses the transfer

    def _accept(self, s: _Step, ok: list[bool]) -> None:
        """Mark the blocks of a completed READ as read (the lease vouches for them)."""
        if not s.ok:
            return
        for i in s.idx:
            ok[i] = True
        self.stats_r.blocks_read += len(s.idx)
        self.stats_r.bytes_read += len(s.idx) * self.block_bytes

    def _verify(
        self, peer: Peer, s: _Step, keys: Sequence[SequenceHash], dst: Sequence[np.ndarray],
        ok: list[bool], bad: list[bytes], check: bool = True,
    ) -> None:
        """Check each block that arrived against the peer's xxh3 (unless ``check`` is
        off: the lease vouches for them); only matches are True."""
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
            if got != want:
                self.stats_r.checksum_failures += 1
                log.warning("kvbm tier %r: block %s from peer %s failed its checksum "
                            "(xxh3 %016x, peer said %016x); a miss",
                            self.name, keys[i].hex(), peer.addr, got, want)
                bad.append(keys[i])
                continue
            if src is not None:
                np.copyto(d, src)
            ok[i] = True
            self.stats_r.blocks_read += 1
            self.stats_r.bytes_read += bb
        self._free_bounce(s)

    def _cancel_or_drain(self, s: _Step) -> None:
        """Stop a timed-out READ before its buffers can be reused.

        A READ that NIXL cannot cancel may still write into its destination later;
        the manager would by then have handed those staging buffers to another block.
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

    # -- housekeeping -----------------------------------------------------------
    def peers(self) -> list[dict[str, Any]]:
        """The peer set: address, instance, whether live."""
        with self._peers_lock:
            return [{"addr": p.addr, "id": p.instance_id, "up": p.up, "failures": p.failures}
                    for p in self._peers.values()]

    def stats(self) -> dict[str, Any]:
        st = self.stats_r
        out: dict[str, Any] = {
            "instance_id": self.instance_id, "listen": self.identity.addr,
            "peers_up": sum(1 for p in self.peers() if p["up"]),
            "peers": len(self._peers), "blocks_read": st.blocks_read, "bytes_read": st.bytes_read,
            "lease_misses": st.lease_misses, "checksum_failures": st.checksum_failures,
            "transfer_errors": st.transfer_errors, "peer_drops": st.peer_drops,
            "bounce_blocks": st.bounce_blocks, "lease_overruns": st.lease_overruns,
        }
        if self._server is not None:
            ss = self._server.stats
            out.update(served_leases=ss.leases, served_blocks=ss.leased_blocks,
                       served_misses=ss.lease_misses, expired_leases=ss.expired_leases,
                       refused_requests=ss.refused, active_leases=self._server.active_leases)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.detach()
        with self._peers_lock:
            peers = list(self._peers.values())
        for p in peers:
            with p.lock:
                self._forget_agent(p)
        with self._nixl_lock:
            for _, _, reg in self._regions.values():
                with contextlib.suppress(Exception):
                    self._agent.deregister_memory(reg)
            self._regions.clear()
        self._bounce_free.clear()
        self._verifier.shutdown(wait=False)
        if self._scanner is not None:
            self._scanner.shutdown(wait=False, cancel_futures=True)
        if self._rdv is not None:
            self._rdv.close()
