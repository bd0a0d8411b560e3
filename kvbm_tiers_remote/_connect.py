"""Connecting the read lanes to a peer when the peer is found, not in the first READ.

UCX wires up an endpoint to a peer on the first transfer that needs one: each read
lane's first READ from a peer waited ~65 ms for it (``kvbm bench --local remote``,
tenth round of docs/benchmarks/remote.md), inside a user's first onboard. Here one
thread per tier does it ahead: when the peer set finds a peer (a rendezvous record
that is new or whose epoch changed, a configured address at start), it makes the
peer live (its agent loaded, as ``PeerSet.live`` would), loads it into every lane
(``CopyLanes.for_peer``), asks NIXL to connect each lane (``make_connection``), asks
the peer to progress its worker (``pump``, as a READ that waits does) and progresses
each lane's worker for a while (NIXL's progress thread is off by default), so the
wire-up messages are answered before any READ.

Nothing here is needed for a read to be right: a connect that fails or has not ended
leaves the READ to connect as before (logged at debug); the engine never waits here.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ._lanes import CopyLanes
from ._peers import Peer, PeerError, PeerSet

log = logging.getLogger("kvbm.remote")

#: How long the lanes' workers are progressed after ``make_connection``: the wire-up
#: takes a few round trips of the peer's pump (0.5 ms naps), well under this.
_WIRE_S = 0.05
_NAP_S = 0.0005


class Connector:
    """Connects ``lanes`` to the peers of ``peers`` on a thread of its own."""

    def __init__(self, name: str, peers: PeerSet, lanes: CopyLanes) -> None:
        self.name = name
        self._peers = peers
        self._lanes = lanes
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            1, thread_name_prefix=f"kvbm-{name}-connect")
        self._lock = threading.Lock()
        #: peer agent name -> how many lanes were connected to it ahead (tests, stats).
        self.connected: dict[str, int] = {}
        self.failures = 0

    def start(self) -> None:
        """List the rendezvous and connect to the configured peers, in the background."""
        self._submit(self._first)

    def found(self, peer: Peer) -> None:
        """``peer`` was just found (or came back with a new agent): connect ahead."""
        self._submit(self._connect, peer)

    def idle(self, timeout: float = 30.0) -> bool:
        """Wait until every connect asked for so far has ended (tests)."""
        done = threading.Event()
        if not self._submit(done.set):
            return True
        return done.wait(timeout)

    def _submit(self, fn: Any, *args: Any) -> bool:
        with self._lock:
            if self._pool is None:
                return False
            try:
                self._pool.submit(fn, *args)
            except RuntimeError:  # shutting down
                return False
            return True

    def _first(self) -> None:
        try:
            self._peers.scan_ahead()  # calls found() for each peer it adds
        except Exception as e:  # a read lists it again; nothing is lost
            log.debug("kvbm tier %r: listing the rendezvous ahead failed (%s)", self.name, e)
        for peer in self._peers.configured():
            self._connect(peer)

    def _connect(self, peer: Peer) -> None:
        try:
            self._connect_lanes(peer)
        except Exception as e:  # the first READ connects instead, as before
            self.failures += 1
            log.debug("kvbm tier %r: connecting ahead to %s failed (%s); the first READ "
                      "connects", self.name, peer.addr, e)

    def _connect_lanes(self, peer: Peer) -> None:
        with peer.lock:
            if not peer.up:
                if time.monotonic() < peer.retry_at:
                    return  # dropped a moment ago: live() retries it when due
                try:
                    self._peers.connect(peer)
                except PeerError as e:
                    log.debug("kvbm tier %r: %s (a read tries it again)", self.name, e)
                    return
            agent = peer.agent
            if agent is None or self.connected.get(agent):
                return
            # The peer progresses its worker for a second after this (see server.py).
            self._peers.send(peer, {"op": "pump"})
        lanes = self._lanes.for_peer(peer)
        for lane in lanes:
            with lane.lock:
                lane.agent.make_connection(agent)
        end = time.monotonic() + _WIRE_S
        while time.monotonic() < end:
            for lane in lanes:
                # A lane busy with a READ progresses its worker itself: skip it.
                if lane.lock.acquire(blocking=False):
                    try:
                        lane.agent.get_new_notifs()
                    finally:
                        lane.lock.release()
            time.sleep(_NAP_S)
        self.connected[agent] = len(lanes)

    def close(self) -> None:
        """Stop connecting (a connect running ends first)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
