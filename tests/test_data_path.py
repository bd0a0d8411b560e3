"""The one data path (planner + executor) where the two copies of it went wrong.

Each test names a behaviour that an earlier manager or vLLM connector got wrong; a
test that loads KV checks the bytes.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from test_manager import blocks, flaky_plugin, manager, onboard_all

from kvbm import ContiguousBlocks, KvBlockManager, KvbmError
from kvbm.plugins import build_plugins
from kvbm.registry import SlotState

from conftest import PAGE, SMALL_MODEL


class _SplitSource:
    """A source whose first copy part raises at once while the other parts are slow."""

    def __init__(self, data: np.ndarray, first: int, delay: float) -> None:
        self.data = data
        self.first = first
        self.delay = delay

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        if self.first in indices:
            raise ValueError("engine block 0 is gone")
        time.sleep(self.delay)
        for i, d in zip(indices, dst):
            np.copyto(d, self.data[i])


def test_a_raising_copy_part_frees_its_slots_only_after_every_part_finished() -> None:
    with manager([{"type": "host", "num_blocks": 8}], copy_threads=2) as mgr:
        a_hashes, _, a_data = blocks(mgr, 8, seed=1)
        b_hashes, b_src, b_data = blocks(mgr, 8, seed=2)
        with pytest.raises(ValueError, match="engine block 0"):
            mgr.offload(a_hashes, _SplitSource(a_data, 0, delay=0.3))
        # The freed slots are reused at once; a late part of the failed copy must not
        # land in them afterwards.
        assert mgr.offload(b_hashes, b_src).stored == 8
        time.sleep(0.5)
        res, out, _ = onboard_all(mgr, b_hashes)
        assert res.loaded == 8
        assert np.array_equal(out, b_data), "a late copy of the failed batch overwrote blocks"


def test_a_match_of_another_manager_is_refused_by_onboard() -> None:
    with manager([{"type": "host", "num_blocks": 8}]) as one, \
            manager([{"type": "host", "num_blocks": 8}]) as two:
        hashes, src, _ = blocks(one, 4)
        one.offload(hashes, src)
        two.offload(hashes, ContiguousBlocks(np.zeros((4, two.block_bytes), np.uint8), two.layout))
        out = np.zeros((4, one.block_bytes), np.uint8)
        with one.match_prefix(hashes) as m, pytest.raises(KvbmError, match="another manager"):
            two.onboard(m, ContiguousBlocks(out, two.layout))


def test_onboard_of_a_released_match_is_refused() -> None:
    with manager([{"type": "host", "num_blocks": 8}]) as mgr:
        hashes, src, _ = blocks(mgr, 4)
        mgr.offload(hashes, src)
        m = mgr.match_prefix(hashes)
        m.release()
        out = np.zeros((4, mgr.block_bytes), np.uint8)
        with pytest.raises(KvbmError, match="released"):
            mgr.onboard(m, ContiguousBlocks(out, mgr.layout))


def test_a_slot_whose_write_failed_is_not_the_first_one_used_again() -> None:
    with manager([{"type": "host", "num_blocks": 2},
                  {"type": "flaky", "name": "lower", "num_blocks": 8}]) as mgr:
        lower = mgr.chain[1].tier
        bad_slot = mgr.chain[1].registry.next_free()  # the next slot the lower tier hands out
        real = lower.write

        def write(slots: Sequence[int], keys: Sequence[bytes], src: Sequence[np.ndarray]) -> list[bool]:
            ok = real(slots, keys, src)
            return [g and s != bad_slot for s, g in zip(slots, ok)]

        lower.write = write
        hashes, src, data = blocks(mgr, 6)
        for i in range(6):  # one block at a time: each cascade asks for one slot
            mgr.offload(hashes[i : i + 1], src, indices=[i])
            mgr.flush()
        st = mgr.stats()["tiers"]["lower"]
        assert st["failed_writes"] == 1, "the dead slot is tried once, then goes last"
        assert st["used_blocks"] == 5


def test_a_match_dropped_without_release_gives_its_pins_back_and_is_counted() -> None:
    with manager([{"type": "host", "num_blocks": 4}]) as mgr:
        hashes, src, _ = blocks(mgr, 8)
        mgr.offload(hashes[:4], src)
        m = mgr.match_prefix(hashes[:4])
        assert m.num_blocks == 4
        del m
        gc.collect()
        # A pinned tier would refuse all four new blocks.
        assert mgr.offload(hashes[4:], src, indices=[4, 5, 6, 7]).stored == 4
        st = mgr.stats()
        assert st["leaked_pins"] == 4 and st["pinned_blocks"] == 0


def writing(reg: Any) -> int:
    """Slots of a registry reserved for a write that was never settled."""
    return sum(1 for s in range(reg.capacity) if reg.state_at(s) == SlotState.WRITING)


class _Gate:
    """Makes a tier's writes wait until opened (a hung device or server)."""

    def __init__(self, tier: Any) -> None:
        self.open = threading.Event()
        real = tier.write

        def write(*a: Any) -> list[bool]:
            self.open.wait(30)
            return real(*a)  # type: ignore[no-any-return]

        tier.write = write


def test_flush_returns_at_its_timeout_while_a_cascade_is_stuck() -> None:
    mgr = manager([{"type": "host", "num_blocks": 8},
                   {"type": "flaky", "name": "stuck", "num_blocks": 8}])
    gate = _Gate(mgr.chain[1].tier)
    try:
        hashes, src, _ = blocks(mgr, 4)
        mgr.offload(hashes, src)
        t0 = time.monotonic()
        cpu0 = time.process_time()
        done = mgr.flush(timeout=0.3)
        assert time.monotonic() - t0 < 1.5, "flush waited past its timeout"
        assert time.process_time() - cpu0 < 0.5, "flush spun on the CPU"
        assert done is False, "flush says the cascade did not finish"
        t0 = time.monotonic()
        mgr.close(timeout=0.3)
        assert time.monotonic() - t0 < 1.5, "close waited past its timeout"
    finally:
        gate.open.set()
        mgr.close()


def test_a_raising_tier_in_the_cascade_leaves_no_slot_being_written() -> None:
    with manager([{"type": "host", "num_blocks": 8},
                  {"type": "host", "name": "lower", "num_blocks": 8}]) as mgr:
        lower = mgr.chain[1].tier

        def views(slots: Sequence[int]) -> Any:
            raise RuntimeError("a tier with a bug")

        lower.views = views
        hashes, src, _ = blocks(mgr, 4)
        mgr.offload(hashes, src)
        mgr.flush()
        assert writing(mgr.chain[1].registry) == 0
        assert mgr.stats()["tiers"]["lower"]["failed_writes"] == 4


def test_a_raising_tier_in_a_promotion_leaves_no_slot_being_written(tmp_path: Any) -> None:
    with manager([{"type": "host", "name": "top", "num_blocks": 4},
                  {"type": "disk", "name": "lower", "num_blocks": 16, "admission": "all",
                   "path": str(tmp_path)}]) as mgr:
        hashes, src, data = blocks(mgr, 8)
        mgr.offload(hashes[:4], src)
        mgr.flush()
        mgr.offload(hashes[4:], src, indices=[4, 5, 6, 7])  # evicts the first four above
        mgr.flush()
        top = mgr.chain[0].tier
        real = top.views

        def views(slots: Sequence[int]) -> Any:
            if any(mgr.chain[0].registry.state_at(s) == SlotState.WRITING for s in slots):
                raise RuntimeError("a tier with a bug")
            return real(slots)

        top.views = views
        res, out, tiers = onboard_all(mgr, hashes[:4])
        assert tiers == ["lower"] * 4 and res.loaded == 4
        assert np.array_equal(out, data[:4])
        assert writing(mgr.chain[0].registry) == 0


def test_hits_in_a_lower_memory_tier_are_promoted_into_the_memory_tier_above() -> None:
    with manager([{"type": "host", "name": "top", "num_blocks": 4},
                  {"type": "host", "name": "lower", "num_blocks": 16}]) as mgr:
        hashes, src, data = blocks(mgr, 8)
        mgr.offload(hashes[:4], src)
        mgr.flush()
        mgr.offload(hashes[4:], src, indices=[4, 5, 6, 7])
        mgr.flush()
        res, out, tiers = onboard_all(mgr, hashes[:4])
        assert tiers == ["lower"] * 4 and np.array_equal(out, data[:4])
        res, out, tiers = onboard_all(mgr, hashes[:4])
        assert tiers == ["top"] * 4, "the hits were promoted"
        assert np.array_equal(out, data[:4])


def test_a_burst_into_a_first_tier_busy_cascading_saves_every_block() -> None:
    mgr = manager([{"type": "host", "num_blocks": 16},
                   {"type": "flaky", "name": "slow", "num_blocks": 4096}], io_threads=2)
    slow = mgr.chain[1].tier
    real = slow.write

    def write(*a: Any) -> list[bool]:
        time.sleep(0.01)
        return real(*a)  # type: ignore[no-any-return]

    slow.write = write
    with mgr:
        hashes, src, data = blocks(mgr, 2000)
        results = [mgr.offload(hashes[s : s + 16], src, indices=range(s, s + 16))
                   for s in range(0, 2000, 16)]  # back to back, no flush between
        mgr.flush()
        held = [h in mgr.chain[0].registry or h in mgr.chain[1].registry for h in hashes]
        assert all(held), f"{held.count(False)} of 2000 blocks were lost"
        assert sum(r.not_saved for r in results) == 0
        assert mgr.stats()["not_saved_blocks"] == 0
        res, out, _ = onboard_all(mgr, hashes[:64])
        assert res.loaded == 64 and np.array_equal(out, data[:64])


def test_blocks_no_tier_can_take_are_counted_as_not_saved() -> None:
    with manager([{"type": "host", "num_blocks": 4}]) as mgr:
        hashes, src, _ = blocks(mgr, 8)
        mgr.offload(hashes[:4], src)
        with mgr.match_prefix(hashes[:4]):
            res = mgr.offload(hashes[4:], src, indices=[4, 5, 6, 7])
        assert res.not_saved == 4
        assert mgr.stats()["not_saved_blocks"] == 4


def test_match_prefix_waits_for_a_hung_shared_tier_no_longer_than_its_probe_deadline() -> None:
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    from s3server import Fault, FaultProxy, MotoServer

    server = MotoServer()
    server.start()
    proxy = FaultProxy(server.port)
    try:
        s3 = server.tier_config(proxy.url, name="s3", prefix="hung", retries=0)
        s3["request_deadline_s"] = 20.0
        with KvBlockManager.from_config({"model": SMALL_MODEL, "page_size": PAGE,
                                         "tiers": [{"type": "host", "num_blocks": 8}, s3],
                                         "probe_timeout_s": 0.3},
                                        plugins=build_plugins(extra_plugins=[flaky_plugin])) as mgr:
            hashes = mgr.hash_tokens(list(range(4 * PAGE)))
            proxy.set(Fault("delay", delay_s=5.0))
            t0 = time.monotonic()
            with mgr.match_prefix(hashes) as m:
                took = time.monotonic() - t0
                assert m.num_blocks == 0
            assert took < 1.5, f"match_prefix waited {took:.1f}s on a hung server"
            proxy.set(None)
    finally:
        proxy.close()
        server.stop()


def test_a_large_save_into_a_disk_first_chain_is_written_in_overlapping_parts_byte_exact(
    tmp_path: Any
) -> None:
    with manager([{"type": "disk", "num_blocks": 64, "path": str(tmp_path),
                   "admission": "all"}]) as mgr:
        hashes, _, data = blocks(mgr, 40)
        parts: list[int] = []
        real = mgr.executor.tiers[0].write

        def write(slots: Sequence[int], keys: Sequence[bytes], bufs: Sequence[np.ndarray]) -> Any:
            parts.append(len(slots))
            return real(slots, keys, bufs)

        mgr.executor.tiers[0].write = write
        # A source without views (an engine's device memory) goes through staging.
        assert mgr.offload(hashes, _SplitSource(data, -1, delay=0.0)).stored == 40
        assert len(parts) > 1 and sum(parts) == 40, "the batch went in parts"
        res, out, _ = onboard_all(mgr, hashes)
        assert res.loaded == 40 and np.array_equal(out, data)


def test_a_source_that_fails_mid_pipeline_leaves_no_late_write_in_reused_slots(
    tmp_path: Any
) -> None:
    with manager([{"type": "disk", "num_blocks": 40, "path": str(tmp_path),
                   "admission": "all"}]) as mgr:
        a_hashes, _, a_data = blocks(mgr, 40, seed=1)
        b_hashes, b_src, b_data = blocks(mgr, 8, seed=2)
        real = mgr.executor.tiers[0].write
        a_keys = set(a_hashes)

        def write(slots: Sequence[int], keys: Sequence[bytes], bufs: Sequence[np.ndarray]) -> Any:
            if keys and keys[0] in a_keys:
                time.sleep(0.2)  # the batch that fails is still being written...
            return real(slots, keys, bufs)

        mgr.executor.tiers[0].write = write
        with pytest.raises(ValueError, match="engine block 0"):
            mgr.offload(a_hashes, _SplitSource(a_data, 35, delay=0.0))
        # ...when a small batch reuses its slots at once (written in this thread).
        assert mgr.offload(b_hashes, b_src).stored == 8
        time.sleep(0.8)
        res, out, _ = onboard_all(mgr, b_hashes)
        assert res.loaded == 8 and np.array_equal(out, b_data), "a late write overwrote a block"
