"""Loads and saves on the request path go first: the write-through cascade waits, part
by part, while one is in flight, and never longer than ``background_yield_ms`` a part
(``kvbm/foreground.py``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from test_manager import blocks, manager

from kvbm.foreground import Foreground, Pauses, request_pause

HOST = {"type": "host", "num_blocks": 8}
BELOW = {"type": "flaky", "name": "below", "num_blocks": 8}


def _yield_in_thread(wait: Callable[[], float], after: float = 0.0
                     ) -> tuple[threading.Thread, list[float]]:
    """``wait()`` (``Foreground.yield_to`` or a ``Pauses``) on a thread of its own,
    ``after`` seconds from now; the seconds it says it waited land in the list."""
    got: list[float] = []

    def run() -> None:
        time.sleep(after)
        got.append(wait())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def test_with_nothing_in_flight_the_cascade_does_not_wait() -> None:
    assert Foreground(10.0).yield_to() == 0.0


def test_the_cascade_waits_until_the_load_in_flight_ends() -> None:
    fg = Foreground(30.0)
    with fg.active():
        t, got = _yield_in_thread(fg.yield_to)
        t.join(0.3)
        assert t.is_alive(), "the cascade went on during a load"
    t.join(5)
    assert not t.is_alive() and got and got[0] >= 0.3


def test_the_cascade_waits_for_every_load_in_flight_not_only_the_first() -> None:
    fg = Foreground(30.0)
    second = fg.active()
    with fg.active():
        second.__enter__()
        t, _ = _yield_in_thread(fg.yield_to)
    t.join(0.3)
    assert t.is_alive(), "the cascade went on while a second load was in flight"
    second.__exit__(None, None, None)
    t.join(5)
    assert not t.is_alive()


def test_the_cascade_waits_no_longer_than_its_cap_a_part() -> None:
    fg = Foreground(0.05)
    with fg.active():
        t, got = _yield_in_thread(fg.yield_to)
        t.join(5)
        assert not t.is_alive(), "the cascade waited past its cap"
    assert 0.04 <= got[0] < 2.0


def test_a_cap_of_zero_turns_the_waiting_off() -> None:
    fg = Foreground(0.0)
    with fg.active():
        assert fg.yield_to() == 0.0


def test_in_parts_writes_every_position_once_in_order() -> None:
    calls: list[tuple[int, int]] = []

    def write(a: int, b: int) -> list[int]:
        calls.append((a, b))
        return list(range(a, b))

    out, waited = Foreground(1.0).in_parts(write, 37, part=16)
    assert calls == [(0, 16), (16, 32), (32, 37)]
    assert out == list(range(37)) and waited == 0.0


def test_a_part_of_zero_writes_all_in_one_call_without_waiting() -> None:
    calls: list[tuple[int, int]] = []

    def write(a: int, b: int) -> list[int]:
        calls.append((a, b))
        return list(range(a, b))

    fg = Foreground(30.0)
    with fg.active():
        out, waited = fg.in_parts(write, 37, part=0)
    assert calls == [(0, 37)] and out == list(range(37)) and waited == 0.0


def test_network_tiers_write_their_cascade_in_one_part_and_local_ones_in_parts() -> None:
    from kvbm_tiers_disk.tier import DiskTier
    from kvbm_tiers_remote.tier import RemoteTier
    from kvbm_tiers_s3.tier import S3Tier

    assert S3Tier.cascade_part_blocks == 0 and RemoteTier.cascade_part_blocks == 0
    assert DiskTier.cascade_part_blocks > 0


def _stored(mgr: Any) -> set[bytes]:
    return set(mgr.chain[1].tier.store.values())


def test_a_cascade_waits_while_a_load_is_in_flight_then_writes_every_block_byte_exact() -> None:
    with manager([HOST, BELOW], background_yield_ms=30000) as mgr:
        hashes, src, data = blocks(mgr, 4)
        with mgr.executor.foreground.active():  # a load that takes its time
            mgr.offload(hashes, src)
            assert mgr.flush(timeout=0.3) is False, "the cascade did not wait for the load"
            assert _stored(mgr) == set()
        assert mgr.flush(timeout=10)
        assert _stored(mgr) == {bytes(r) for r in data}


def test_a_cascade_behind_a_load_that_never_ends_still_moves_after_its_cap() -> None:
    with manager([HOST, BELOW], background_yield_ms=50) as mgr:
        hashes, src, data = blocks(mgr, 4)
        with mgr.executor.foreground.active():
            mgr.offload(hashes, src)
            assert mgr.flush(timeout=10), "the cascade starved behind the load"
            assert _stored(mgr) == {bytes(r) for r in data}


class _Recording:
    """Engine blocks in an array that note, at each copy, how many loads and saves
    the executor counts in flight."""

    def __init__(self, data: np.ndarray, fg: Foreground) -> None:
        self.data, self.fg, self.seen = data, fg, []  # type: list[int]

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        self.seen.append(self.fg.in_flight)
        for i, d in zip(indices, dst):
            d[:] = self.data[i]

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        self.seen.append(self.fg.in_flight)
        for i, s in zip(indices, src):
            self.data[i] = s


def test_a_save_and_a_load_are_in_flight_for_the_whole_of_their_copies() -> None:
    with manager([{"type": "flaky", "num_blocks": 8}]) as mgr:
        fg = mgr.executor.foreground
        hashes, _, data = blocks(mgr, 4)
        src = _Recording(data, fg)
        assert mgr.offload(hashes, src).stored == 4
        dst = _Recording(np.zeros_like(data), fg)
        with mgr.match_prefix(hashes) as m:
            assert mgr.onboard(m, dst).loaded == 4
        assert src.seen and set(src.seen) == {1}
        assert dst.seen and set(dst.seen) == {1}
        assert fg.in_flight == 0
        np.testing.assert_array_equal(dst.data, data)


# -- a network tier's requests, paused one by one (``Foreground.background``) ----------
def test_a_cascade_writes_request_waits_until_the_load_in_flight_ends() -> None:
    fg = Foreground(30.0)
    with fg.background() as p, fg.active():
        t, got = _yield_in_thread(p)
        t.join(0.3)
        assert t.is_alive(), "a request of the cascade went out during a load"
    t.join(5)
    assert not t.is_alive() and got and got[0] >= 0.3


def test_the_requests_of_one_cascade_write_share_one_deadline() -> None:
    """A request that starts to wait late ends with the first one: the write as a
    whole waits at most the cap, not the cap once per request."""
    fg = Foreground(1.0)
    with fg.background() as p, fg.active():
        first, got1 = _yield_in_thread(p)
        late, got2 = _yield_in_thread(p, after=0.6)
        first.join(5)
        late.join(5)
    assert got1 and 0.9 <= got1[0] < 1.6
    assert got2 and got2[0] < 0.75, f"the late request waited {got2[0]:.2f} s, a cap of its own"


def test_waited_counts_the_time_any_request_waited_not_the_sum() -> None:
    fg = Foreground(0.5)
    with fg.background() as p, fg.active():
        ts = [_yield_in_thread(p)[0] for _ in range(4)]
        for t in ts:
            t.join(5)
    assert 0.45 <= p.waited < 1.0, p.waited


def test_only_the_thread_writing_a_cascade_is_asked_to_pause() -> None:
    fg = Foreground(1.0)
    assert request_pause() is None
    seen: list[Pauses | None] = []
    with fg.background() as p:
        assert request_pause() is p
        t = threading.Thread(target=lambda: seen.append(request_pause()))
        t.start()
        t.join()
    assert seen == [None], "another thread (a save, a read) was asked to pause"
    assert request_pause() is None
