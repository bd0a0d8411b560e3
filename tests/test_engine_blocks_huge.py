"""``engine_huge_pages``: the engine's CPU KV tensors moved onto 2 MiB pages when they are
registered (MADV_HUGEPAGE + MADV_COLLAPSE), in place, bytes unchanged; a kernel that
refuses leaves them on 4 KiB pages, logged once, and every copy stays byte-exact. The
default, 'auto', moves them on a background thread (tests/test_engine_blocks_huge_auto.py);
these tests are of 'on' (True: before registration returns) and 'off'."""

from __future__ import annotations

import ctypes
import logging
import re
import sys
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm.config import KvbmSettings  # noqa: E402
from kvbm.engine_blocks import _native, engine_blocks  # noqa: E402
from kvbm.manager import KvBlockManager  # noqa: E402

# 2 layers of [2, 64 blocks, 16 tokens, 8 heads, 128] bf16: 64 KiB a block and layer,
# 4 MiB a layer tensor (so each holds at least one whole aligned 2 MiB page).
MODEL = {"name": "huge-test", "num_layers": 2, "num_kv_heads": 8, "head_dim": 128,
         "dtype": "bfloat16"}
NB = 64


def _tensors(seed: int) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, NB, 16, 8, 256), generator=g, dtype=torch.uint8)
            .view(torch.bfloat16) for _ in range(MODEL["num_layers"])]


def _huge_bytes(lo: int, hi: int) -> int:
    """AnonHugePages of this process's mappings that overlap [lo, hi)."""
    total, cur = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                cur = int(m.group(1), 16) < hi and int(m.group(2), 16) > lo
            elif cur and line.startswith("AnonHugePages:"):
                total += int(line.split()[1]) * 1024
    return total


def _manager() -> KvBlockManager:
    return KvBlockManager.from_config({"model": MODEL, "page_size": 16, "copy_threads": 1,
                                       "tiers": [{"type": "host", "num_blocks": 16}]})


def test_engine_huge_pages_defaults_to_auto_and_reads_on_and_off() -> None:
    assert KvbmSettings(model=MODEL).engine_huge_pages == "auto"
    assert KvbmSettings(model=MODEL, engine_huge_pages="on").engine_huge_pages is True
    assert KvbmSettings(model=MODEL, engine_huge_pages="off").engine_huge_pages is False


def test_without_the_setting_no_tensor_is_advised(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(spans: Any) -> tuple[int, str | None]:
        raise AssertionError("advise_huge_pages called without huge_pages=True")

    monkeypatch.setattr(_native, "advise_huge_pages", refuse)
    with _manager() as mgr:
        eng = engine_blocks(_tensors(0), mgr.layout, plugins=mgr.plugins)
    assert eng.huge_page_bytes == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise advice is Linux's")
def test_huge_pages_move_the_tensors_onto_2mib_pages_with_their_bytes() -> None:
    kv = _tensors(1)
    before = [t.view(torch.uint8).clone() for t in kv]
    with _manager() as mgr:
        eng = engine_blocks(kv, mgr.layout, plugins=mgr.plugins, huge_pages=True)
    if eng.huge_pages_refused is not None:  # pragma: no cover - kernel < 6.1 or THP off
        pytest.skip(f"this kernel refuses: {eng.huge_pages_refused}")
    assert eng.huge_page_bytes >= MODEL["num_layers"] * 2 * 2**20
    on_huge = sum(_huge_bytes(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes())
                  for t in kv)
    assert on_huge >= eng.huge_page_bytes
    assert all(torch.equal(t.view(torch.uint8), b) for t, b in zip(kv, before))


def _round_trip(eng: Any, kv: list[Any], mgr: KvBlockManager, corrupt: bool) -> int:
    """Offload blocks 0..7, onboard them into 8..15 (zeroed first); the mismatched
    blocks (with ``corrupt``, one byte of every stored block flipped in the host arena
    first)."""
    src, dst = list(range(8)), list(range(15, 7, -1))
    hashes = mgr.hash_tokens(np.arange(8 * 16, dtype=np.uint32) + 7 * corrupt)
    assert mgr.offload(hashes, eng, indices=src).stored == 8
    if corrupt:
        mgr.executor.tiers[0].slots[:, 12345] ^= 0xFF
    u8 = [t.view(torch.uint8) for t in kv]
    for t in u8:
        t[:, 8:16].zero_()
    with mgr.match_prefix(hashes) as m:
        assert mgr.onboard(m, eng, indices=dst).loaded == 8
    return sum(not all(torch.equal(t[:, s], t[:, d]) for t in u8) for s, d in zip(src, dst))


def test_huge_page_tensors_offload_and_onboard_byte_exact() -> None:
    kv = _tensors(2)
    with _manager() as mgr:
        eng = engine_blocks(kv, mgr.layout, plugins=mgr.plugins, huge_pages=True)
        assert _round_trip(eng, kv, mgr, corrupt=False) == 0
        # Negative control: the same check sees one flipped byte in the host tier.
        assert _round_trip(eng, kv, mgr, corrupt=True) == 8


def test_a_refused_collapse_is_logged_once_and_copies_stay_exact(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def madvise(addr: int, n: int, advice: int) -> int:
        calls.append(advice)
        if advice == _native.MADV_COLLAPSE:
            ctypes.set_errno(22)
            return -1
        return 0

    monkeypatch.setattr(_native, "_madvise", lambda: madvise)
    monkeypatch.setattr(_native, "_huge_warned", False)
    kv = _tensors(3)
    with caplog.at_level(logging.WARNING, logger="kvbm"), _manager() as mgr:
        eng = engine_blocks(kv, mgr.layout, plugins=mgr.plugins, huge_pages=True)
        again = engine_blocks(_tensors(4), mgr.layout, plugins=mgr.plugins, huge_pages=True)
        assert _round_trip(eng, kv, mgr, corrupt=False) == 0
    assert _native.MADV_COLLAPSE in calls
    assert eng.huge_page_bytes == 0 and again.huge_page_bytes == 0
    assert eng.huge_pages_refused is not None and "MADV_COLLAPSE" in eng.huge_pages_refused
    assert "errno 22" in eng.huge_pages_refused
    warned = [r for r in caplog.records if "engine_huge_pages" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]


def test_device_tensors_ignore_the_setting() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the option is dropped only for device tensors")
    kv = [t.cuda() for t in _tensors(5)]  # pragma: no cover - needs a GPU
    with _manager() as mgr:  # pragma: no cover
        eng = engine_blocks(kv, mgr.layout, plugins=mgr.plugins, huge_pages=True)
    assert getattr(eng, "huge_page_bytes", 0) == 0  # pragma: no cover
