"""The remote tier: blocks in the host tiers of peer instances, read over NIXL.

This module holds ``RemoteTier``, the glue between the core's ``Tier`` contract and
the tier's parts: the peer set (``_peers.py``: discovery, hello, drops and retries),
the read pipeline (``_reader.py``: leases, pipelined NIXL READs, checksums), the
block server (``server.py``) and the rendezvous (``rendezvous.py``).

Reading. ``probe`` asks the live peers which keys they hold (a ``probe`` request in
``peers`` mode; the hash lists they publish in ``rendezvous_dir`` or ``rendezvous_s3``
mode, without waiting for their NIXL agents: those load on a thread from the tier's
start) and remembers who holds what. ``read`` then hands each peer's blocks to the
read pipeline: it leases them (the peer pins them and reports each block's address
and xxh3), reads them with one-sided NIXL READs straight from the peer's arena into
the destination buffers, verifies each block's xxh3 and releases the lease, in
pipelined steps of ``pipeline_bytes``. A block the peer lost, a checksum mismatch, a
transfer error or timeout is a failed block (``False``), never data; a peer that
fails is dropped from the peer set and tried again after ``retry_after_s`` (a
restarted peer comes back with a new NIXL agent).

Serving. The executor calls ``serve`` with the slot map (``kvbm.served.ServedBlocks``)
it keeps of the tier served (the first tier above with a ``peer_arena()``, or
``serve_tier``, as ``served_tier`` picks): the arena is registered with this tier's
NIXL agent and a ``BlockServer`` starts on ``listen``; with a rendezvous (a directory
or an S3 prefix) it also publishes this instance's metadata, address and served
hashes there, with a heartbeat rewritten every ``publish_interval_s``. Readers ignore
a record whose heartbeat is older than ``stale_intervals`` of the publisher's
intervals (a killed peer's leftover, which would otherwise cost a failed connect
every ``retry_after_s``); closing the tier stops serving and removes the record.
Only configured peers are served.

Place: last in the chain. The tier takes no offloads, so in a write-through chain
every tier below it would never receive a block; ``check_chain`` refuses that chain.

The remote tier stores nothing: its ``read_only`` admission rejects every offload,
and its registry only records which peer blocks this instance adopted.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack
import numpy as np
import xxhash

from kvbm.errors import ConfigError
from kvbm.hashing import SequenceHash
from kvbm.tier import Tier, TierContext

from ._peers import Peer, PeerError, PeerSet, RemoteStats
from ._reader import BlockReader
from .config import RemoteTierConfig
from .protocol import split_addr
from .rendezvous import DirectoryRendezvous, Rendezvous, open_rendezvous
from .server import BlockServer, Identity

if TYPE_CHECKING:
    from kvbm.config import TierConfig
    from kvbm.served import ServedBlocks

# Peer, PeerError and RemoteStats were defined here before the split; they stay
# importable from this module.
__all__ = ["Peer", "PeerError", "RemoteStats", "RemoteTier"]

log = logging.getLogger("kvbm.remote")


class RemoteTier(Tier):
    """Peers' host tiers over NIXL; also serves this instance's host tier to them."""

    kind: ClassVar[str] = "remote"
    medium: ClassVar[str] = "REMOTE"
    shared: ClassVar[bool] = True
    cascade_part_blocks: ClassVar[int] = 0  # parts would drain the requests in flight
    serves_peers: ClassVar[bool] = True
    default_admission: ClassVar[str] = "read_only"
    #: One part (the base's 0): reads in parts of 8 gained nothing in `kvbm bench
    #: --local remote` on 2 vCPUs, where the READ + hash lanes already hold every core
    #: (docs/benchmarks/remote.md, ninth round); worth trying again with more cores.
    #: Keys of ``stats()`` that only grow: exported as counters (kvbm_tier_stat_total).
    counter_stats: ClassVar[frozenset[str]] = frozenset({
        "blocks_read", "bytes_read", "lease_misses", "transfer_errors", "peer_drops",
        "bounce_blocks", "lease_overruns", "served_leases", "served_blocks", "served_misses",
        "expired_leases", "refused_requests"})

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
        self._peer_addrs = frozenset(config.peers)
        self.stats_r = RemoteStats()
        self._peer_set = PeerSet(self.name, config, self._agent, self._nixl_lock,
                                 self.identity, self._rdv, self.stats_r)
        self._where: OrderedDict[bytes, str] = OrderedDict()
        self._where_lock = threading.Lock()
        def make_agent(k: int) -> Any:
            """Copy lane ``k``'s own NIXL agent (one agent runs one transfer at a time)."""
            lane = nixl_agent(f"{agent_name}-r{k}",
                              nixl_agent_config(enable_prog_thread=False, backends=[]))
            lane.create_backend("UCX", opts)
            return lane

        self._reader = BlockReader(self.name, config, self._agent, self._nixl_lock,
                                   self.block_bytes, self._peer_set, self.stats_r, make_agent)
        self._server: BlockServer | None = None
        self._served_reg: Any = None
        self._publisher: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        # The published peers' agents loaded now, on a thread, not in the first probe.
        self._peer_set.connect_ahead()

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
        """This instance's record in a ``rendezvous_dir``."""
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
        """List the rendezvous for peers now (``force``) or when its interval is due."""
        self._peer_set.scan_dir(force)

    # -- Tier contract ----------------------------------------------------------
    def probe(self, keys: Sequence[SequenceHash]) -> list[bool]:
        """Which of ``keys`` some live peer holds; remembers who, for ``read``."""
        self.stats_r.probes += 1
        found = [False] * len(keys)
        for peer in self._peer_set.probing():
            todo = [i for i, f in enumerate(found) if not f]
            if not todo:
                break
            if peer.from_dir:
                have = peer.hashes
                hits = [i for i in todo if keys[i] in have]
            else:
                try:
                    with peer.lock:
                        reply = self._peer_set.rpc(
                            peer, {"op": "probe", "keys": [keys[i] for i in todo]}
                        )
                except PeerError as e:
                    self._peer_set.drop(peer, str(e))
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
        """Store nothing: every block fails (the tier takes no offloads)."""
        # Peers fill this tier; its 'read_only' admission keeps offloads away.
        return [False] * len(slots)

    def discard(self, slots: Sequence[int], keys: Sequence[SequenceHash]) -> None:
        """Forget which peer holds ``keys`` (the registry dropped them)."""
        for k in keys:
            self._where.pop(k, None)

    def read(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], dst: Sequence[np.ndarray]
    ) -> list[bool]:
        """Read ``keys`` from the peers that hold them into ``dst``; True per block read
        and verified (a block no live peer holds, or whose read failed, is False)."""
        n = len(keys)
        ok = [False] * n
        if n == 0:
            return ok
        peers = {p.key: p for p in self._peer_set.live()}
        lost = [i for i in range(n) if self._where.get(keys[i]) not in peers]
        if lost:
            # Adopted a while ago, or its peer restarted: ask again who holds it.
            self.probe([keys[i] for i in lost])
            peers = {p.key: p for p in self._peer_set.live()}
        groups: dict[str, list[int]] = {}
        for i in range(n):
            pk = self._where.get(keys[i])
            if pk in peers:
                groups.setdefault(pk, []).append(i)
        for pk, idx in groups.items():
            self._reader.read_from(peers[pk], idx, keys, dst, ok)
        failed = [keys[i] for i in range(n) if not ok[i]]
        if failed:
            # The planner drops a block whose read failed once nobody pins it; here
            # only forget where it was, so a later probe asks again.
            with self._where_lock:
                for k in failed:
                    self._where.pop(k, None)
        return ok

    # -- housekeeping -----------------------------------------------------------
    def peers(self) -> list[dict[str, Any]]:
        """The peer set: address, instance, whether live."""
        return self._peer_set.describe()

    def stats(self) -> dict[str, Any]:
        """Counters of the reading side, and of the serving side while serving."""
        st = self.stats_r
        out: dict[str, Any] = {
            "instance_id": self.instance_id, "listen": self.identity.addr,
            "peers_up": sum(1 for p in self.peers() if p["up"]),
            "peers": len(self._peer_set), "blocks_read": st.blocks_read, "bytes_read": st.bytes_read,
            "lease_misses": st.lease_misses, "checksum_failures": st.checksum_failures,
            "transfer_errors": st.transfer_errors, "peer_drops": st.peer_drops,
            "bounce_blocks": st.bounce_blocks, "lease_overruns": st.lease_overruns,
            "speculative_blocks": st.speculative_blocks,
            "speculative_misses": st.speculative_misses,
        }
        if self._server is not None:
            ss = self._server.stats
            out.update(served_leases=ss.leases, served_blocks=ss.leased_blocks,
                       served_misses=ss.lease_misses, expired_leases=ss.expired_leases,
                       refused_requests=ss.refused, active_leases=self._server.active_leases)
        return out

    def close(self) -> None:
        """Stop serving, forget the peers, deregister local memory, close the rendezvous."""
        if self._closed:
            return
        self._closed = True
        self.detach()
        self._peer_set.close()
        self._reader.close()
        if self._rdv is not None:
            self._rdv.close()
