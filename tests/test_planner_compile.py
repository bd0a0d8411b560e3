"""The planner's compiled batch allocation is built when the manager starts, not in
its first offload (a compile of 0.1-0.3 s inside an engine step)."""

from __future__ import annotations

import numpy as np
import pytest
from test_manager import HOST, blocks, manager, onboard_all

from kvbm import _allocate_native, _cc


def test_the_first_offload_compiles_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    if _cc.compiler() is None:
        pytest.skip("no C compiler")
    fresh = _cc.Once(_allocate_native._build)  # as in a fresh process
    monkeypatch.setattr(_allocate_native, "_alloc", fresh)
    with manager([HOST]) as mgr:
        built = fresh() if fresh.done else None

        def no_compile(*a: object, **k: object) -> None:
            raise AssertionError("compiled during an offload")

        monkeypatch.setattr(_cc, "build", no_compile)
        hashes, src, data = blocks(mgr, 6)
        assert mgr.offload(hashes, src).stored == 6
        res, out, _ = onboard_all(mgr, hashes)
        assert res.loaded == 6 and np.array_equal(out, data)
    assert built is not None  # the batch allocation was there before the offload
