"""KvBlockManager: match, offload, onboard, cascade, promotion, faults, events."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import types
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pytest

from kvbm import (
    BlockEvent,
    ContiguousBlocks,
    EventKind,
    KvBlockManager,
    LayoutError,
    LogSink,
    Tier,
    TierConfig,
    hookimpl,
)
from kvbm.plugins import build_plugins

from conftest import PAGE, SMALL_MODEL


class FlakyTierConfig(TierConfig):
    type: Literal["flaky"] = "flaky"
    mode: Literal["ok", "raise", "false", "corrupt"] = "ok"


class FlakyTier(Tier):
    """A dict-backed tier whose writes and reads fail in the way its config says."""

    kind = "flaky"

    def __init__(self, config: FlakyTierConfig, ctx: Any) -> None:  # type: ignore[override]
        super().__init__(config, ctx)
        self.mode = config.mode
        self.store: dict[int, bytes] = {}

    def write(self, slots: Sequence[int], keys: Sequence[bytes], src: Sequence[np.ndarray]) -> list[bool]:
        if self.mode == "raise":
            raise OSError(28, "No space left on device")
        for s, b in zip(slots, src):
            self.store[s] = bytes(b)
        return [self.mode != "false"] * len(slots)

    def read(self, slots: Sequence[int], keys: Sequence[bytes], dst: Sequence[np.ndarray]) -> list[bool]:
        if self.mode == "raise":
            raise OSError(5, "Input/output error")
        out = []
        for i, (s, d) in enumerate(zip(slots, dst)):
            d[:] = np.frombuffer(self.store[s], np.uint8)
            # "corrupt": the second block of every batch fails its check.
            out.append(not (self.mode == "corrupt" and i == 1))
        return out


flaky_plugin = types.ModuleType("flaky_plugin")


@hookimpl
def _register(registry: Any) -> None:
    registry.add("flaky", factory=f"{__name__}:FlakyTier", config_model=FlakyTierConfig)


flaky_plugin.kvbm_register_tiers = _register  # type: ignore[attr-defined]

lifecycle: list[str] = []


@hookimpl
def _chain_built(manager: KvBlockManager) -> None:
    lifecycle.append("kvbm_chain_built")


@hookimpl
def _shutdown(manager: KvBlockManager) -> None:
    lifecycle.append("kvbm_shutdown")


flaky_plugin.kvbm_chain_built = _chain_built  # type: ignore[attr-defined]
flaky_plugin.kvbm_shutdown = _shutdown  # type: ignore[attr-defined]


def manager(tiers: list[dict[str, Any]], **kw: Any) -> KvBlockManager:
    plugins = build_plugins(extra_plugins=[flaky_plugin])
    return KvBlockManager.from_config({"model": SMALL_MODEL, "page_size": PAGE, "tiers": tiers, **kw},
                                      plugins=plugins)


def blocks(mgr: KvBlockManager, n: int, seed: int = 0) -> tuple[list[bytes], ContiguousBlocks, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 1000, n * PAGE)
    data = rng.integers(0, 256, (n, mgr.block_bytes), dtype=np.uint8)
    return mgr.hash_tokens(tokens), ContiguousBlocks(data, mgr.layout), data


def onboard_all(mgr: KvBlockManager, hashes: list[bytes]) -> tuple[Any, np.ndarray, list[str]]:
    out = np.zeros((len(hashes), mgr.block_bytes), np.uint8)
    with mgr.match_prefix(hashes) as m:
        res = mgr.onboard(m, ContiguousBlocks(out, mgr.layout))
        tiers = list(m.tiers)
    return res, out, tiers


HOST = {"type": "host", "num_blocks": 16}


def test_offloaded_blocks_come_back_byte_exact() -> None:
    with manager([HOST]) as mgr:
        hashes, src, data = blocks(mgr, 6)
        assert mgr.offload(hashes, src).stored == 6
        res, out, _ = onboard_all(mgr, hashes)
        assert res.loaded == 6 and np.array_equal(out, data)


def test_match_accepts_tokens_and_hashes_alike() -> None:
    with manager([HOST]) as mgr:
        rng = np.random.default_rng(1)
        tokens = rng.integers(0, 1000, 3 * PAGE + 1)
        hashes = mgr.hash_tokens(tokens)
        mgr.offload(hashes, ContiguousBlocks(np.zeros((3, mgr.block_bytes), np.uint8), mgr.layout))
        with mgr.match_prefix(tokens) as a, mgr.match_prefix(hashes) as b:
            assert a.hashes == b.hashes == hashes and a.num_tokens == 3 * PAGE


def test_match_stops_at_the_first_missing_block() -> None:
    with manager([HOST]) as mgr:
        hashes, src, _ = blocks(mgr, 5)
        mgr.offload([hashes[0], hashes[1], hashes[3], hashes[4]], src, indices=[0, 1, 3, 4])
        with mgr.match_prefix(hashes) as m:
            assert m.hashes == hashes[:2]


def test_blocks_already_held_are_not_written_again() -> None:
    with manager([HOST]) as mgr:
        hashes, src, _ = blocks(mgr, 4)
        mgr.offload(hashes[:2], src)
        res = mgr.offload(hashes, src)
        assert (res.stored, res.present) == (2, 2)


def test_pinned_blocks_are_not_evicted_while_matched() -> None:
    with manager([{"type": "host", "num_blocks": 4}]) as mgr:
        hashes, src, _ = blocks(mgr, 8)
        mgr.offload(hashes[:4], src)
        with mgr.match_prefix(hashes[:4]):
            res = mgr.offload(hashes[4:], src, indices=[4, 5, 6, 7])
            assert res.stored == 0 and res.not_saved == 4
        assert mgr.offload(hashes[4:], src, indices=[4, 5, 6, 7]).stored == 4


def test_release_is_idempotent() -> None:
    with manager([HOST]) as mgr:
        hashes, src, _ = blocks(mgr, 2)
        mgr.offload(hashes, src)
        m = mgr.match_prefix(hashes)
        m.release()
        m.release()
        assert mgr.stats()["tiers"]["host"]["evictable_blocks"] == 2


def test_write_through_cascades_every_block_to_the_lower_tier() -> None:
    with manager([{"type": "host", "num_blocks": 4}, {"type": "flaky", "num_blocks": 16}]) as mgr:
        hashes, src, _ = blocks(mgr, 4)
        mgr.offload(hashes, src)
        mgr.flush()
        assert mgr.stats()["tiers"]["flaky"]["used_blocks"] == 4


def test_blocks_evicted_above_are_onboarded_from_below_and_promoted() -> None:
    with manager([{"type": "host", "num_blocks": 2}, {"type": "flaky", "num_blocks": 16}]) as mgr:
        hashes, src, data = blocks(mgr, 6)
        for i in range(0, 6, 2):
            mgr.offload(hashes[i : i + 2], src, indices=[i, i + 1])
            mgr.flush()
        res, out, tiers = onboard_all(mgr, hashes[:2])
        assert tiers == ["flaky", "flaky"] and res.loaded == 2 and np.array_equal(out, data[:2])
        with mgr.match_prefix(hashes[:2]) as m:
            assert m.tiers == ["host", "host"]


def test_a_raising_lower_tier_is_a_skipped_write_not_an_exception(caplog: pytest.LogCaptureFixture) -> None:
    with manager([HOST, {"type": "flaky", "num_blocks": 16, "mode": "raise"}]) as mgr:
        hashes, src, data = blocks(mgr, 3)
        with caplog.at_level(logging.WARNING, logger="kvbm"):
            mgr.offload(hashes, src)
            mgr.flush()
        st = mgr.stats()["tiers"]
        assert st["flaky"]["failed_writes"] == 3 and st["flaky"]["used_blocks"] == 0
        assert "No space left" in caplog.text
        res, out, _ = onboard_all(mgr, hashes)
        assert res.loaded == 3 and np.array_equal(out, data), "the upper tier kept every block"


def test_a_raising_first_tier_is_a_failed_offload_not_an_exception() -> None:
    with manager([{"type": "flaky", "num_blocks": 8, "mode": "raise"}]) as mgr:
        hashes, src, _ = blocks(mgr, 3)
        assert mgr.offload(hashes, src).failed == 3
        with mgr.match_prefix(hashes) as m:
            assert m.num_blocks == 0


def test_a_block_that_fails_its_check_ends_the_valid_prefix() -> None:
    with manager([{"type": "flaky", "num_blocks": 8, "mode": "corrupt"}]) as mgr:
        hashes, src, data = blocks(mgr, 4)
        mgr.offload(hashes, src)
        res, out, _ = onboard_all(mgr, hashes)
        assert res.loaded == 1 and res.failed == [1]
        assert mgr.stats()["tiers"]["flaky"]["failed_reads"] == 1


def test_a_raising_read_is_a_miss_not_an_exception() -> None:
    with manager([{"type": "flaky", "num_blocks": 8}]) as mgr:
        hashes, src, _ = blocks(mgr, 2)
        mgr.offload(hashes, src)
        mgr.chain[0].tier.mode = "raise"  # type: ignore[attr-defined]
        res, _, _ = onboard_all(mgr, hashes)
        assert res.loaded == 0 and res.failed == [0, 1]


def test_bad_source_raises_before_anything_is_registered() -> None:
    with manager([HOST]) as mgr:
        hashes, src, _ = blocks(mgr, 2)
        with pytest.raises(LayoutError):
            mgr.offload(hashes, src, indices=[0, 7])
        assert mgr.stats()["tiers"]["host"]["used_blocks"] == 0
        with mgr.match_prefix(hashes) as m:
            assert m.num_blocks == 0


def test_offload_of_mismatched_lengths_is_rejected() -> None:
    with manager([HOST]) as mgr:
        hashes, src, _ = blocks(mgr, 2)
        with pytest.raises(ValueError, match="2 hashes but 1 source indices"):
            mgr.offload(hashes, src, indices=[0])


def test_awaitable_forms_give_the_same_results() -> None:
    async def run(mgr: KvBlockManager) -> bool:
        hashes, src, data = blocks(mgr, 3)
        await mgr.offload_async(hashes, src)
        out = np.zeros_like(data)
        m = await mgr.match_prefix_async(hashes)
        res = await mgr.onboard_async(m, ContiguousBlocks(out, mgr.layout))
        m.release()
        return res.loaded == 3 and np.array_equal(out, data)

    with manager([HOST]) as mgr:
        assert asyncio.run(run(mgr))


def test_subscribers_receive_batched_lifecycle_events() -> None:
    got: list[BlockEvent] = []
    with manager([{"type": "host", "num_blocks": 2}]) as mgr:
        mgr.events.subscribe(got.extend)
        hashes, src, _ = blocks(mgr, 3)
        mgr.offload(hashes[:2], src)
        mgr.match_prefix(hashes[:1]).release()
        mgr.offload(hashes[2:], src, indices=[2])
        mgr.events.drain()
    kinds = [(e.kind, len(e.hashes)) for e in got]
    assert (EventKind.ALLOCATED, 2) in kinds and (EventKind.REGISTERED, 2) in kinds
    assert (EventKind.MATCHED, 1) in kinds and (EventKind.EVICTED, 1) in kinds
    evicted = next(e for e in got if e.kind is EventKind.EVICTED)
    assert evicted.hashes == (hashes[1],) and evicted.tier == "host"


def test_a_failing_subscriber_does_not_break_offload_or_other_subscribers() -> None:
    got: list[BlockEvent] = []

    def broken(events: Sequence[BlockEvent]) -> None:
        raise RuntimeError("subscriber bug")

    with manager([HOST]) as mgr:
        mgr.events.subscribe(broken)
        mgr.events.subscribe(got.extend)
        hashes, src, _ = blocks(mgr, 2)
        assert mgr.offload(hashes, src).stored == 2
        mgr.events.drain()
        assert got and mgr.events.failed_deliveries >= 1


def test_a_slow_subscriber_never_blocks_the_data_path() -> None:
    gate = threading.Event()
    with manager([HOST]) as mgr:
        mgr.events._queue.maxsize = 2
        mgr.events.subscribe(lambda ev: gate.wait(5))
        t0 = time.perf_counter()
        for i in range(10):
            hashes, src, _ = blocks(mgr, 1, seed=i)
            mgr.offload(hashes, src)
        elapsed = time.perf_counter() - t0
        gate.set()
        assert mgr.events.dropped_batches > 0 and elapsed < 4


def test_no_subscriber_means_no_events_are_collected() -> None:
    with manager([HOST]) as mgr:
        hashes, src, _ = blocks(mgr, 2)
        mgr.offload(hashes, src)
        assert mgr.chain[0].registry._pending == {}


def test_log_sink_writes_a_line_per_event(caplog: pytest.LogCaptureFixture) -> None:
    with manager([HOST]) as mgr, caplog.at_level(logging.INFO, logger="kvbm.events"):
        mgr.events.subscribe(LogSink())
        hashes, src, _ = blocks(mgr, 2)
        mgr.offload(hashes, src)
        mgr.events.drain()
    assert "kvbm host registered: 2 blocks" in caplog.text


def test_plugins_hear_chain_built_and_shutdown() -> None:
    lifecycle.clear()
    manager([HOST]).close()
    assert lifecycle == ["kvbm_chain_built", "kvbm_shutdown"]


def test_stats_report_paths_with_bytes_and_rates() -> None:
    with manager([HOST]) as mgr:
        hashes, src, _ = blocks(mgr, 4)
        mgr.offload(hashes, src)
        onboard_all(mgr, hashes)
        paths = mgr.stats()["paths"]
        assert paths["offload:host"]["bytes"] == paths["onboard:host"]["bytes"] == 4 * mgr.block_bytes


def test_a_repeat_offload_reoffers_held_blocks_so_a_frequency_filter_admits_them() -> None:
    lower = {"type": "flaky", "num_blocks": 16, "admission": "frequency"}
    with manager([HOST, lower]) as mgr:
        hashes, src, _ = blocks(mgr, 3)
        mgr.offload(hashes, src)
        mgr.flush()
        assert mgr.stats()["tiers"]["flaky"]["used_blocks"] == 0, "first offer is below the threshold"
        res = mgr.offload(hashes, src)
        mgr.flush()
        assert res.present == 3 and mgr.stats()["tiers"]["flaky"]["used_blocks"] == 3


def test_a_block_that_failed_its_read_is_dropped_from_its_tier_on_release() -> None:
    with manager([{"type": "flaky", "num_blocks": 8, "mode": "corrupt"}]) as mgr:
        hashes, src, _ = blocks(mgr, 3)
        mgr.offload(hashes, src)
        onboard_all(mgr, hashes)
        with mgr.match_prefix(hashes) as m:
            assert m.hashes == hashes[:1], "the corrupt second block is no longer matched"


def test_lower_tier_reads_straight_into_a_contiguous_destination() -> None:
    with manager([{"type": "flaky", "num_blocks": 8}]) as mgr:
        hashes, src, data = blocks(mgr, 3)
        mgr.offload(hashes, src)
        seen: list[np.ndarray] = []
        tier = mgr.chain[0].tier
        real_read = tier.read
        tier.read = lambda slots, keys, dst: (seen.extend(dst), real_read(slots, keys, dst))[1]  # type: ignore[method-assign]
        res, out, _ = onboard_all(mgr, hashes)
        assert res.loaded == 3 and np.array_equal(out, data)
        assert all(np.shares_memory(b, out) for b in seen), "no staging copy in between"
