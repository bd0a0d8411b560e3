"""Copy lanes of the remote tier's reader: the threads that READ one batch at once.

One NIXL agent runs one transfer at a time here (two at once on one agent crashed
the process), and with UCX's ``cma`` transport a READ is a synchronous copy on the
thread that posts it. So the reader copies with ``read_threads`` lanes, each a
thread with its own agent: the calling thread with the tier's agent, the others
with agents made on the first read. Each lane READs a part and hashes it itself
right after (xxh3 releases the GIL), while the other lanes copy: no queue between a
READ and its hash, and a batch's copy runs on as many cores as there are lanes. A
lane with no part left to READ takes the hashes still waiting from the others' last
READs, so the batch ends when the last READ's hashes do, shared.

Every agent call takes its lane's lock; the tier's agent keeps the tier's lock (the
server and the peer set use it too). Every local region the reader registers is
registered with every lane, and a peer's NIXL metadata is loaded into a lane's
agent before the lane first READs from it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ._peers import Peer

log = logging.getLogger("kvbm.remote")

T = TypeVar("T")

#: A lane with no unit left to start, waiting for another lane's READ to end (its
#: hashes to share), yields at once for this long, then naps ``_NAP_S`` at a time.
_SPIN_S = 50e-6
_NAP_S = 50e-6


class Lane:
    """One copy thread's NIXL agent and the lock every use of it takes."""

    __slots__ = ("agent", "lock", "remotes", "regs")

    def __init__(self, agent: Any, lock: threading.RLock) -> None:
        self.agent = agent
        self.lock = lock
        # Peers' agents loaded into this lane's agent (the tier's own lane: None,
        # the peer set loads them): agent name -> the metadata loaded.
        self.remotes: dict[str, bytes] | None = None
        self.regs: list[Any] = []  # this lane's registrations of the reader's regions


class CopyLanes:
    """The reader's lanes: ``main`` (the tier's agent, on the calling thread) and up to
    ``count - 1`` more, made by ``make_agent(k)`` on first use. If an extra agent
    cannot be made the reader copies with the lanes it has (logged once)."""

    def __init__(self, name: str, count: int, agent: Any, nixl_lock: threading.RLock,
                 make_agent: Callable[[int], Any] | None) -> None:
        self.name = name
        self.main = Lane(agent, nixl_lock)
        self._want = count if make_agent is not None else 1
        self._make = make_agent
        self._extra: list[Lane] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._regions: list[tuple[int, int]] = []  # (address, bytes) registered so far
        self._lock = threading.Lock()
        self._warm: threading.Thread | None = None

    def warm(self) -> None:
        """Make the extra lanes' agents now, on a thread of their own, not inside the
        first read (``kvbm bench --local remote``: 81 ms of the first onboard's 338, load
        ~3); a read that comes first waits for them (``_extras`` holds the lock)."""
        if self._want > 1 and self._extra is None and self._warm is None:
            self._warm = threading.Thread(target=self._warm_up, name=f"kvbm-{self.name}-lanes",
                                          daemon=True)
            self._warm.start()

    def _warm_up(self) -> None:
        with contextlib.suppress(Exception):  # _extras logs a lane it cannot make
            self._extras()

    def _extras(self) -> list[Lane]:
        if self._extra is not None:
            return self._extra
        with self._lock:
            if self._extra is not None:
                return self._extra
            extra: list[Lane] = []
            assert self._make is not None or self._want == 1
            for k in range(1, self._want):
                try:
                    lane = Lane(self._make(k), threading.RLock())  # type: ignore[misc]
                    lane.remotes = {}
                    for addr, nbytes in self._regions:
                        lane.regs.append(lane.agent.register_memory([(addr, nbytes, 0, "")], "DRAM"))
                except Exception as e:
                    log.warning("kvbm tier %r: a second NIXL agent for reading could not be "
                                "made (%s); reading with %d thread(s)", self.name, e, k)
                    break
                extra.append(lane)
            if len(extra) > 0:
                self._pool = ThreadPoolExecutor(len(extra), thread_name_prefix=f"kvbm-{self.name}-read")
            self._extra = extra
            return extra

    def register(self, addr: int, nbytes: int) -> None:
        """Register a local region the main lane just registered with every other lane
        (a lane that fails to is no longer used)."""
        with self._lock:
            self._regions.append((addr, nbytes))
            for lane in list(self._extra or ()):
                try:
                    with lane.lock:
                        lane.regs.append(lane.agent.register_memory([(addr, nbytes, 0, "")], "DRAM"))
                except Exception as e:
                    # A lane without every region could READ into memory it lacks: drop it.
                    log.warning("kvbm tier %r: registering %d bytes with a read lane failed "
                                "(%s); reading with one thread fewer", self.name, nbytes, e)
                    assert self._extra is not None
                    self._extra = [x for x in self._extra if x is not lane]

    def for_peer(self, peer: Peer) -> list[Lane]:
        """The lanes ready to READ from ``peer`` (its metadata loaded into each lane's
        agent); the main lane always, the others where loading worked."""
        out = [self.main]
        agent = peer.agent
        if agent is None or self._want == 1:
            return out
        for lane in self._extras():
            assert lane.remotes is not None
            if lane.remotes.get(agent) != peer.metadata:  # (a record re-read: same bytes)
                try:
                    with lane.lock:
                        if agent in lane.remotes:
                            lane.agent.remove_remote_agent(agent)
                            del lane.remotes[agent]
                        name = lane.agent.add_remote_agent(peer.metadata)
                except Exception as e:
                    log.debug("kvbm remote: loading peer %s into a read lane failed (%s)",
                              peer.addr, e)
                    continue
                if name != agent:
                    continue  # not the agent the peer set knows: do not use this lane
                lane.remotes[agent] = peer.metadata
            out.append(lane)
        return out

    def forget(self, peer: Peer) -> None:
        """Unload ``peer``'s agent from the extra lanes (it failed; a reconnect reloads)."""
        agent = peer.agent
        for lane in self._extra or ():
            assert lane.remotes is not None
            if agent is not None and lane.remotes.pop(agent, None) is not None:
                with lane.lock, contextlib.suppress(Exception):
                    lane.agent.remove_remote_agent(agent)

    def run(self, lanes: Sequence[Lane], units: Sequence[T],
            work: Callable[[Lane, T], Iterable[Callable[[], None]] | None],
            after: Callable[[], None] | None = None) -> None:
        """``work(lane, unit)`` for every unit, each unit on one lane: the calling thread
        runs ``lanes[0]``, the pool the others; a lane takes the next unit when it is
        free. ``work`` may return tasks that finish its unit (a READ's hashes): the lane
        runs them right after, and a lane with no unit left to start takes the ones
        still waiting (from the other end), until every unit has ended, so the last
        READ's hashes are shared instead of one lane waiting on the other.

        ``after`` runs on the calling thread once no unit is left for it to start
        (while the others end theirs). The first exception stops every lane from
        taking more units and is raised once all of them have stopped (no READ is left
        running)."""
        it = iter(units)  # next() on a list iterator is atomic under the GIL
        failed: list[BaseException] = []
        tail: deque[Callable[[], None]] = deque()  # finishing tasks not yet begun
        busy = [0]  # units begun and not yet ended (their tasks not yet in ``tail``)
        count = threading.Lock()

        def drain(pop: Callable[[], Callable[[], None]]) -> None:
            while not failed:
                try:
                    task = pop()
                except IndexError:
                    return
                try:
                    task()
                except BaseException as e:  # noqa: BLE001 - raised on the calling thread
                    failed.append(e)

        def loop(lane: Lane, last: Callable[[], None] | None) -> None:
            for u in it:
                if failed:
                    return
                with count:
                    busy[0] += 1
                try:
                    tail.extend(work(lane, u) or ())
                except BaseException as e:  # noqa: BLE001 - raised on the calling thread
                    failed.append(e)
                    return
                finally:
                    with count:
                        busy[0] -= 1
                drain(tail.pop)  # this unit's tasks: the bytes are still in the cache
            if last is not None and not failed:
                try:
                    last()
                except BaseException as e:  # noqa: BLE001 - raised on the calling thread
                    failed.append(e)
                    return
            # No unit left to start: share the tasks of the units still running.
            spin_until = time.monotonic() + _SPIN_S
            while not failed:
                drain(tail.popleft)
                if busy[0] == 0 and not tail:
                    return
                # Another lane's READ is running: its hashes come within a READ's time.
                time.sleep(0 if time.monotonic() < spin_until else _NAP_S)

        pool = self._pool
        futs = [pool.submit(loop, lane, None) for lane in lanes[1 : len(units)]] if pool else []
        try:
            loop(lanes[0], after)
        except BaseException as e:  # noqa: BLE001 - raised once every lane has stopped
            failed.append(e)
        finally:
            for f in futs:
                if not f.cancel():  # a lane that never started has nothing to wait for
                    f.result()
        if failed:
            raise failed[0]

    def close(self) -> None:
        """Deregister the regions from the extra lanes and stop their threads."""
        if self._warm is not None:
            self._warm.join()  # no lane made after this
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for lane in self._extra or ():
            with lane.lock:
                for reg in lane.regs:
                    with contextlib.suppress(Exception):
                        lane.agent.deregister_memory(reg)
                for agent in lane.remotes or ():
                    with contextlib.suppress(Exception):
                        lane.agent.remove_remote_agent(agent)
            lane.regs = []
        self._extra = []
