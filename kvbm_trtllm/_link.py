"""How the workers' reports reach the leader: a collective across ranks, a link in-process.

TensorRT-LLM's connector API carries data one way only: the leader's metadata down to
every worker. What kvbm's planner needs back — which operations every rank finished,
and which blocks failed; each rank's layout and recovered blocks at start — travels
in two hops:

1. every rank calls the same collective at the same point of TRT-LLM's loop
   (``register_kv_caches`` at start, ``get_finished`` and ``wait_for_save`` in each
   step; TRT-LLM calls them on all ranks in lockstep and gathers right after itself),
   so rank 0 receives all ranks' messages;
2. rank 0's worker shares its process with the leader (TRT-LLM builds both there from
   the same ``llm_args``): it posts what it gathered on the ``Link`` of that
   ``llm_args``, and the leader reads it at its next call.

``Collective`` is TRT-LLM's MPI (``tensorrt_llm._utils.mpi_allgather``) when there is
more than one rank, nothing at all when there is one.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .messages import WorkerHello, WorkerReport


class Collective(Protocol):
    """Every rank calls ``allgather`` at the same point; each gets all ranks' objects."""

    rank: int
    size: int

    def allgather(self, obj: Any) -> list[Any]:
        """All ranks' ``obj`` in rank order."""
        ...


class SingleRank:
    """One rank: gathering is returning one's own object."""

    def __init__(self) -> None:
        self.rank = 0
        self.size = 1

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]


class TrtllmMpi:
    """TensorRT-LLM's own MPI collectives (the communicator its executor uses)."""

    def __init__(self, rank: int, size: int,
                 allgather: Callable[[Any], list[Any]] | None = None) -> None:
        self.rank = rank
        self.size = size
        if allgather is None:
            from tensorrt_llm._utils import mpi_allgather

            allgather = mpi_allgather
        self._allgather = allgather

    def allgather(self, obj: Any) -> list[Any]:
        return list(self._allgather(obj))


def collective_for(rank: int, size: int) -> Collective:
    """The collective for ``size`` ranks: none for one, TRT-LLM's MPI for more."""
    return SingleRank() if size == 1 else TrtllmMpi(rank, size)


class Link:
    """What rank 0's worker gathered, waiting for the leader in the same process."""

    def __init__(self) -> None:
        self._hellos: list[WorkerHello] | None = None
        self._hello_event = threading.Event()
        self._reports: deque[list[WorkerReport]] = deque()

    def post_hellos(self, hellos: list[WorkerHello]) -> None:
        """Every rank's hello, once, at start."""
        self._hellos = list(hellos)
        self._hello_event.set()

    def hellos(self, timeout: float | None = 0.0) -> list[WorkerHello] | None:
        """The hellos, waiting up to ``timeout`` seconds for them (None: not yet)."""
        if timeout is None or timeout > 0:
            self._hello_event.wait(timeout)
        return self._hellos

    def post_reports(self, reports: list[WorkerReport]) -> None:
        """Every rank's report of one step (deque appends are atomic: no lock)."""
        self._reports.append(reports)

    def take_reports(self) -> list[WorkerReport]:
        """Reports posted since the last call, oldest first."""
        out: list[WorkerReport] = []
        while self._reports:
            out.extend(self._reports.popleft())
        return out


_links: dict[int, tuple[Any, Link]] = {}
_lock = threading.Lock()


def link_for(llm_args: Any) -> Link:
    """The link of the engine built from ``llm_args`` (made on first use).

    Keyed by the object's identity: TRT-LLM hands the leader and rank 0's worker the
    same ``llm_args``. The entry keeps a reference to it, so the id cannot be reused
    by another object while the link lives.
    """
    with _lock:
        entry = _links.get(id(llm_args))
        if entry is None or entry[0] is not llm_args:
            entry = _links[id(llm_args)] = (llm_args, Link())
        return entry[1]


def drop_link(llm_args: Any) -> None:
    """Forget the engine's link (its leader or worker shut down)."""
    with _lock:
        entry = _links.get(id(llm_args))
        if entry is not None and entry[0] is llm_args:
            del _links[id(llm_args)]


__all__ = ["Collective", "Link", "SingleRank", "TrtllmMpi", "collective_for", "drop_link",
           "link_for"]
