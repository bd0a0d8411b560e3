"""How many copy threads the start-up probe keeps (``_native.copy_threads_worth``): one
disturbed moment does not drop a process to one thread for its whole life; a second
thread that is slower round after round is dropped."""

from __future__ import annotations

import types
from typing import Any

import pytest

from kvbm.engine_blocks import _native

pytestmark = pytest.mark.skipif(_native.copy_runs() is None, reason="no C compiler")


def _fake_clock(monkeypatch: pytest.MonkeyPatch, split_costs: list[float]) -> list[str]:
    """A virtual clock: a 1-thread probe copy takes 1.0, the i-th shared one
    ``split_costs[i]`` (the last repeated). Returns the calls made, in order."""
    now = [0.0]
    calls: list[str] = []

    def run_copy(*a: Any) -> None:
        shared = getattr(_native._par, "v", None) is not None
        k = sum(c == "split" for c in calls)
        now[0] += split_costs[min(k, len(split_costs) - 1)] if shared else 1.0
        calls.append("split" if shared else "single")

    monkeypatch.setattr(_native, "run_copy", run_copy)
    monkeypatch.setattr(_native, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(_native, "_split_choice", {})
    return calls


def test_one_slow_round_of_the_shared_copy_does_not_drop_the_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_clock(monkeypatch, [2.0, 2.0, 2.0, 0.5])  # a core busy for one round
    assert _native.copy_threads_worth(2) == 2
    assert calls.count("split") == 6  # a second round, then it stops


def test_a_shared_copy_slower_in_every_round_drops_to_one_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_clock(monkeypatch, [2.0])
    assert _native.copy_threads_worth(2) == 1
    assert calls.count("split") == 9 and calls.count("single") == 9


def test_a_shared_copy_that_pays_at_once_is_kept_after_one_round(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_clock(monkeypatch, [0.6])
    assert _native.copy_threads_worth(2) == 2
    assert calls.count("split") == 3
