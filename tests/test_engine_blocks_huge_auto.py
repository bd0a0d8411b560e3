"""``engine_huge_pages='auto'`` (the default): the engine's CPU KV tensors moved onto 2 MiB
pages on a background thread after registration, in bounded chunks; registration and
copies never wait for it, the engine's bytes do not change, one info line when it ends
and one when the kernel refuses (then nothing more is tried)."""

from __future__ import annotations

import ctypes
import errno
import logging
import sys
import threading
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from test_engine_blocks_huge import MODEL, _huge_bytes, _manager, _round_trip, _tensors  # noqa: E402

from kvbm.engine_blocks import _huge, _native, engine_blocks  # noqa: E402
from kvbm.errors import LayoutError  # noqa: E402


class FakeMadvise:
    """``madvise`` that records its calls; MADV_COLLAPSE waits for ``gate`` (when given)
    and fails with ``fail(call number)``'s errno where that is not 0."""

    def __init__(self, gate: threading.Event | None = None,
                 fail: Any = lambda k: 0) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.gate = gate
        self.gate_timed_out = False
        self.fail = fail
        self.collapses = 0

    def __call__(self, addr: int, n: int, advice: int) -> int:
        self.calls.append((addr, n, advice))
        if advice != _native.MADV_COLLAPSE:
            return 0
        self.collapses += 1
        if self.gate is not None and not self.gate.wait(10):
            self.gate_timed_out = True
        err = self.fail(self.collapses)
        if err:
            ctypes.set_errno(err)
            return -1
        return 0


def _big(seed: int) -> list[Any]:
    """``_tensors``' layers with 256 blocks: 16 MiB a layer, so each holds seven or more
    whole 2 MiB pages wherever the allocator puts it."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 256, 16, 8, 256), generator=g, dtype=torch.uint8)
            .view(torch.bfloat16) for _ in range(MODEL["num_layers"])]


def _bytes_changed(kv: list[Any], before: list[Any]) -> int:
    """Layers whose bytes differ from ``before``."""
    return sum(not torch.equal(t.view(torch.uint8), b) for t, b in zip(kv, before))


def _collapse_calls(fake: FakeMadvise) -> list[tuple[int, int]]:
    return [(a, n) for a, n, adv in fake.calls if adv == _native.MADV_COLLAPSE]


def test_the_adapter_reads_auto_on_and_off_and_names_a_bad_value() -> None:
    assert [_huge.mode_of(v) for v in ("auto", "on", "off", True, False, None, "AUTO")] == [
        "auto", "on", "off", "on", "off", "off", "auto"]
    with _manager() as mgr, pytest.raises(LayoutError, match="'sometimes' is not a choice"):
        engine_blocks(_tensors(0), mgr.layout, plugins=mgr.plugins, huge_pages="sometimes")


def test_auto_registration_and_copies_do_not_wait_for_the_collapse(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    fake = FakeMadvise(gate)
    monkeypatch.setattr(_native, "_madvise", lambda: fake)
    kv = _tensors(10)
    with _manager() as mgr:
        eng = engine_blocks(kv, mgr.layout, plugins=mgr.plugins, huge_pages="auto")
        # The collapse is held inside its first call: registration returned, copies run.
        assert eng.huge_pages is not None and not eng.huge_pages.finished
        assert _round_trip(eng, kv, mgr, corrupt=False) == 0
        assert not eng.huge_pages.finished
        gate.set()
        assert eng.huge_pages.wait(10)
    # Negative control: had registration waited for the collapse, the gate (opened only
    # after it returned) would have timed out in the first call.
    assert not fake.gate_timed_out
    assert eng.huge_page_bytes >= MODEL["num_layers"] * 2 * 2**20
    assert eng.huge_pages_refused is None


def test_auto_collapses_every_aligned_range_in_chunks_of_at_most_chunk_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_huge, "CHUNK_BYTES", 2 * 2**20)
    fake = FakeMadvise()
    monkeypatch.setattr(_native, "_madvise", lambda: fake)
    kv = _big(11)
    with _manager() as mgr:
        eng = engine_blocks(kv, mgr.layout, plugins=mgr.plugins, huge_pages="auto")
        assert eng.huge_pages is not None and eng.huge_pages.wait(10)
    calls = _collapse_calls(fake)
    assert len(calls) >= 14 and all(n <= 2 * 2**20 for _, n in calls)
    got = {a + k for a, n in calls for k in range(0, n, 2**21)}
    for t in kv:  # every 2 MiB page inside each tensor's memory was asked for
        lo = -(-t.data_ptr() // 2**21) * 2**21
        hi = (t.data_ptr() + t.untyped_storage().nbytes()) // 2**21 * 2**21
        assert set(range(lo, hi, 2**21)) <= got


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise advice is Linux's")
def test_auto_moves_the_pages_in_the_background_and_keeps_every_engine_byte(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_huge, "CHUNK_BYTES", 2 * 2**20)  # many calls, between the copies
    kv = _big(12)
    before = [t.view(torch.uint8).clone() for t in kv]
    with _manager() as mgr:
        eng = engine_blocks(kv, mgr.layout, plugins=mgr.plugins, huge_pages="auto")
        assert eng.huge_pages is not None
        # Copies run while the collapse may be moving their blocks.
        assert _round_trip(eng, kv, mgr, corrupt=False) == 0
        assert eng.huge_pages.wait(30)
    if eng.huge_pages_refused is not None:  # pragma: no cover - kernel < 6.1 or THP off
        pytest.skip(f"this kernel refuses: {eng.huge_pages_refused}")
    assert eng.huge_page_bytes >= MODEL["num_layers"] * 14 * 2**20
    on_huge = sum(_huge_bytes(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes())
                  for t in kv)
    assert on_huge >= eng.huge_page_bytes - 2 * len(kv) * 2**21  # edge pages: best effort
    # The round trip wrote blocks 8..15 (copies of 0..7, checked above); every byte
    # outside them is as it was before, and they hold blocks 0..7 as they were before.
    for t, b in zip(kv, before):
        u8 = t.view(torch.uint8)
        assert torch.equal(u8[:, 8:16], b[:, list(range(7, -1, -1))])
        u8[:, 8:16] = b[:, 8:16]
    assert _bytes_changed(kv, before) == 0
    # Negative control: the same comparison sees one changed byte.
    kv[1].view(torch.uint8)[1, 40, 3, 2, 7] ^= 0x5A
    assert _bytes_changed(kv, before) == 1


def test_a_refusing_kernel_gives_one_info_line_and_no_further_calls(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeMadvise(fail=lambda k: errno.EINVAL)
    monkeypatch.setattr(_native, "_madvise", lambda: fake)
    kv = _tensors(13)
    with caplog.at_level(logging.INFO, logger="kvbm"), _manager() as mgr:
        eng = engine_blocks(kv, mgr.layout, plugins=mgr.plugins, huge_pages="auto")
        assert eng.huge_pages is not None and eng.huge_pages.wait(10)
        assert _round_trip(eng, kv, mgr, corrupt=False) == 0
    assert fake.collapses == 1  # refused for good: not asked again for the other layer
    assert eng.huge_page_bytes == 0
    assert eng.huge_pages_refused is not None and "MADV_COLLAPSE" in eng.huge_pages_refused
    assert "errno 22" in eng.huge_pages_refused
    lines = [r for r in caplog.records if "engine_huge_pages" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, [r.getMessage() for r in lines]
    assert "stay on the pages they have" in lines[0].getMessage()


def test_a_finished_collapse_gives_one_info_line(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeMadvise()
    monkeypatch.setattr(_native, "_madvise", lambda: fake)
    with caplog.at_level(logging.INFO, logger="kvbm"), _manager() as mgr:
        eng = engine_blocks(_tensors(14), mgr.layout, plugins=mgr.plugins, huge_pages="auto")
        assert eng.huge_pages is not None and eng.huge_pages.wait(10)
    lines = [r.getMessage() for r in caplog.records if "engine_huge_pages" in r.getMessage()]
    assert len(lines) == 1 and "moved onto 2 MiB pages in the background" in lines[0], lines


def test_a_range_the_kernel_cannot_move_now_is_skipped_and_the_rest_moved(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_huge, "CHUNK_BYTES", 2 * 2**20)
    fake = FakeMadvise(fail=lambda k: errno.EAGAIN if k == 1 else 0)
    monkeypatch.setattr(_native, "_madvise", lambda: fake)
    with _manager() as mgr:
        eng = engine_blocks(_tensors(15), mgr.layout, plugins=mgr.plugins, huge_pages="auto")
        assert eng.huge_pages is not None and eng.huge_pages.wait(10)
    assert eng.huge_pages_refused is None
    assert eng.huge_pages.skipped_bytes == 2 * 2**20
    assert fake.collapses > 2 and eng.huge_page_bytes > 0


def test_close_stops_the_collapse_after_the_call_under_way(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_huge, "CHUNK_BYTES", 2 * 2**20)
    gate = threading.Event()
    fake = FakeMadvise(gate)
    monkeypatch.setattr(_native, "_madvise", lambda: fake)
    with _manager() as mgr:
        eng = engine_blocks(_tensors(16), mgr.layout, plugins=mgr.plugins, huge_pages="auto")
    assert eng.huge_pages is not None
    timer = threading.Timer(0.2, gate.set)
    timer.start()
    eng.close()  # returns once the call held at the gate ends
    timer.join()
    assert eng.huge_pages.finished
    assert fake.collapses == 1  # of the 2 x 4 MiB / 2 MiB chunks, only the one under way
