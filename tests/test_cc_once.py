"""``kvbm._cc.Once``: what the compiled modules build from their library, built once per
process (``build`` at the first call, under a lock), a None kept, an exception passed on."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from kvbm import _cc


class _Unlocked(_cc.Once[Any]):
    """The check without the lock: the negative control of the threads test."""

    def __call__(self) -> Any:
        if not self._done:
            self._value = self._build()
            self._done = True
        return self._value


def _race(make: Callable[[Callable[[], object]], Callable[[], object]]) -> tuple[int, set[int]]:
    """Eight threads released by one barrier call the same ``make(build)``; ``build``
    yields the CPU while it runs (as a compile does): how many times it ran, and the
    ids of what the threads got."""
    runs: list[int] = []
    barrier = threading.Barrier(8)
    got: list[object] = []

    def build() -> object:
        runs.append(1)
        time.sleep(0.05)
        return object()

    value = make(build)

    def call() -> None:
        barrier.wait()
        got.append(value())

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(runs), {id(g) for g in got}


def test_build_runs_once_when_eight_threads_call_at_the_same_time() -> None:
    runs, values = _race(_cc.Once)
    assert runs == 1 and len(values) == 1


def test_without_the_lock_eight_threads_build_more_than_once() -> None:
    """Negative control: the race above is real, so the lock is what passes it."""
    runs, values = _race(_Unlocked)
    assert runs > 1 and len(values) > 1


def test_a_none_result_is_kept_and_not_built_again() -> None:
    runs: list[int] = []

    def build() -> None:
        runs.append(1)

    o: _cc.Once[int] = _cc.Once(build)
    assert not o.done
    assert o() is None and o() is None
    assert o.done and runs == [1]


def test_an_exception_in_build_reaches_the_caller_and_the_next_call_builds_again() -> None:
    calls: list[int] = []

    def build() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first build fails")
        return 7

    o = _cc.Once(build)
    with pytest.raises(RuntimeError, match="first build fails"):
        o()
    assert not o.done
    assert o() == 7 and o() == 7 and len(calls) == 2


def test_a_forked_child_keeps_the_value_built_before_the_fork() -> None:
    runs: list[int] = []

    def build() -> int:
        runs.append(1)
        return 41

    o = _cc.Once(build)
    assert o() == 41
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: never back into pytest
        code = 2
        try:
            code = 0 if o() == 41 and runs == [1] else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _fork_during_build(reinit: bool) -> int:
    """A thread is inside ``build`` (holding the lock) when the process forks; the
    child's exit code: 0 when its own call built the value, -SIGALRM when that call
    still waited after 3 s. ``reinit`` False undoes the fresh lock the fork gave."""
    inside, release = threading.Event(), threading.Event()

    def build() -> int:
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            release.wait(10)
        return 5

    o = _cc.Once(build)
    held = o._lock
    t = threading.Thread(target=o)
    t.start()
    try:
        assert inside.wait(10)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child: never back into pytest
            code = 2
            try:
                if not reinit:
                    o._lock = held  # as before Once: the lock the building thread held
                signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's
                signal.alarm(3)
                code = 0 if o() == 5 else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        t.join()
    return os.waitstatus_to_exitcode(status)


def test_a_child_forked_while_another_thread_builds_builds_the_value_itself() -> None:
    assert _fork_during_build(reinit=True) == 0


def test_without_the_fresh_lock_that_child_waits_for_ever() -> None:
    """Negative control: the lock copied from the parent is never released in the child."""
    assert _fork_during_build(reinit=False) == -signal.SIGALRM
