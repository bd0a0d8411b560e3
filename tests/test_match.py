"""A Match's pins when it is dropped: given back once, by the match that holds them."""

from __future__ import annotations

import gc
from typing import Any

from test_manager import blocks, manager


def _pinned(mgr: Any) -> int:
    return int(mgr.stats()["pinned_blocks"])


def test_a_match_dropped_in_a_reference_cycle_gives_its_pins_back_when_collected() -> None:
    with manager([{"type": "host", "num_blocks": 4}]) as mgr:
        hashes, src, _ = blocks(mgr, 8)
        mgr.offload(hashes[:4], src)
        m = mgr.match_prefix(hashes[:4])
        m.cycle = [m]  # only the cycle collector frees it
        assert _pinned(mgr) == 4
        del m
        gc.collect()
        # The pins come back at the planner's next call: all four new blocks fit.
        assert mgr.offload(hashes[4:], src, indices=[4, 5, 6, 7]).stored == 4
        st = mgr.stats()
        assert st["leaked_pins"] == 4 and st["pinned_blocks"] == 0


def test_a_dropped_part_gives_nothing_back_while_its_match_holds_the_pins() -> None:
    with manager([{"type": "host", "num_blocks": 4}]) as mgr:
        hashes, src, _ = blocks(mgr, 4)
        mgr.offload(hashes, src)
        m = mgr.match_prefix(hashes)
        p = m.part(1, 2)
        assert p.num_blocks == 2
        del p
        gc.collect()
        mgr.planner.take_plan()  # a planner call: queued leaked pins are taken back here
        st = mgr.stats()
        assert st["leaked_pins"] == 0 and st["pinned_blocks"] == 4
        m.release()
        assert _pinned(mgr) == 0
