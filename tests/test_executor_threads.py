"""Copy threads: an explicit ``copy_threads`` is taken as given; left at its default, a
start-up measurement (one thread against the shared copy) keeps the threads unless
they copy slower than one."""

from __future__ import annotations

import pytest

from kvbm import KvBlockManager
from kvbm.engine_blocks import _native

from conftest import PAGE, SMALL_MODEL

if _native.copy_runs() is None:  # pragma: no cover - a machine without a C compiler
    pytest.skip("no C compiler: no streamed copy to measure", allow_module_level=True)


def _manager(**top: object) -> KvBlockManager:
    host: dict[str, object] = {"type": "host", "num_blocks": 4}
    if "copy_threads" in top:
        host["copy_threads"] = top["copy_threads"]
    return KvBlockManager.from_config(
        {"model": SMALL_MODEL, "page_size": PAGE, "tiers": [host], **top})


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "_split_choice", {})


def test_an_explicit_copy_threads_is_used_as_given(fresh: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "_SPLIT_GAIN", 1e9)  # a split would never pay
    with _manager(copy_threads=3) as mgr:
        assert mgr.executor._copy_threads == 3
        assert mgr.chain[0].tier._threads == 3  # type: ignore[attr-defined]


def test_default_copy_threads_drop_to_one_where_a_split_copies_no_faster(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "_SPLIT_GAIN", 1e9)
    with _manager() as mgr:
        assert mgr.executor._copy_threads == 1
        assert mgr.chain[0].tier._threads == 1  # type: ignore[attr-defined]


def test_default_copy_threads_stay_where_a_split_pays(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "_SPLIT_GAIN", 0.0)  # any split counts as faster
    with _manager() as mgr:
        assert mgr.executor._copy_threads == 2
        assert mgr.chain[0].tier._threads == 2  # type: ignore[attr-defined]


def test_the_measurement_runs_once_per_process_and_count(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _native.copy_threads_worth(2) in (1, 2)
    monkeypatch.setattr(_native, "_SPLIT_GAIN", 0.0 if _native._split_choice[2] == 1 else 1e9)
    first = _native._split_choice[2]
    assert _native.copy_threads_worth(2) == first  # cached: the changed rule is not re-run
    assert _native.copy_threads_worth(1) == 1
