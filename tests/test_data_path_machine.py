"""The whole data path on a host + disk chain, driven by hypothesis, with faults and threads.

Every block's bytes are a function of its sequence hash, so any block that reaches
the engine can be checked without predicting which tier kept it: an onboarded byte
that differs is wrong KV, the one failure kvbm must never have. Faults are injected
into the real disk tier (a write or read that raises or answers short) and into its
real file (a flipped data byte, which its checksum must catch). At the end every
match is released and the cascade flushed: no pin and no slot being written remain.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbm import ContiguousBlocks, KvBlockManager
from kvbm.planner import Match
from kvbm.registry import SlotState

from conftest import PAGE, SMALL_MODEL

#: Prompts share prefixes: prompt p is the common head, then p's own blocks.
HEAD_BLOCKS = 2
PROMPTS = 5
BLOCKS_PER_PROMPT = 6


def prompt_tokens(p: int) -> list[int]:
    head = list(range(HEAD_BLOCKS * PAGE))
    own = [1000 + p * 97 + i for i in range((BLOCKS_PER_PROMPT - HEAD_BLOCKS) * PAGE)]
    return head + own


def pattern(h: bytes, nbytes: int) -> np.ndarray:
    """The bytes of the block named ``h``: a swapped, torn or stale block differs."""
    return np.random.default_rng(int.from_bytes(h[:8], "little")).integers(
        0, 256, nbytes, dtype=np.uint8)


class Faults:
    """Fault switches on one tier instance: the next ``n`` writes or reads misbehave."""

    def __init__(self, tier: Any) -> None:
        self.tier = tier
        self.write_mode: str | None = None
        self.read_mode: str | None = None
        self.writes_left = 0
        self.reads_left = 0
        real_write, real_read = tier.write, tier.read

        def write(slots: Sequence[int], keys: Sequence[bytes], src: Sequence[np.ndarray]) -> Any:
            mode = self._take("write")
            if mode == "raise":
                raise OSError(5, "Input/output error")
            ok = real_write(slots, keys, src)
            return ok[: len(ok) // 2] if mode == "short" else ok

        def read(slots: Sequence[int], keys: Sequence[bytes], dst: Sequence[np.ndarray]) -> Any:
            mode = self._take("read")
            if mode == "raise":
                raise OSError(5, "Input/output error")
            ok = real_read(slots, keys, dst)
            return ok[: len(ok) // 2] if mode == "short" else ok

        tier.write, tier.read = write, read

    def _take(self, what: str) -> str | None:
        if what == "write" and self.writes_left > 0:
            self.writes_left -= 1
            return self.write_mode
        if what == "read" and self.reads_left > 0:
            self.reads_left -= 1
            return self.read_mode
        return None


class DataPathMachine(RuleBasedStateMachine):
    """Offload, match, onboard, hold, release and faults against a real host + disk chain."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvbm-machine-")
        self.mgr = KvBlockManager.from_config({
            "model": SMALL_MODEL, "page_size": PAGE, "copy_threads": 2, "io_threads": 2,
            "tiers": [{"type": "host", "num_blocks": 6, "touch": False},
                      {"type": "disk", "num_blocks": 10, "path": self.dir, "admission": "all"}],
        })
        self.bb = self.mgr.block_bytes
        self.hashes = [self.mgr.hash_tokens(prompt_tokens(p)) for p in range(PROMPTS)]
        self.data = [np.stack([pattern(h, self.bb) for h in hs]) for hs in self.hashes]
        self.disk = self.mgr.chain[1].tier
        self.faults = Faults(self.disk)
        self.held: list[tuple[int, Match]] = []
        self.loaded_blocks = 0
        self.pool = ThreadPoolExecutor(2)

    # -- the engine's calls ----------------------------------------------------------------
    def _offload(self, p: int, n: int) -> None:
        src = ContiguousBlocks(self.data[p], self.mgr.layout)
        self.mgr.offload(self.hashes[p][:n], src, indices=range(n))

    @rule(p=st.integers(0, PROMPTS - 1), n=st.integers(1, BLOCKS_PER_PROMPT))
    def offload(self, p: int, n: int) -> None:
        self._offload(p, n)

    @rule(p=st.integers(0, PROMPTS - 1), q=st.integers(0, PROMPTS - 1),
          n=st.integers(1, BLOCKS_PER_PROMPT))
    def offload_from_two_threads(self, p: int, q: int, n: int) -> None:
        futs = [self.pool.submit(self._offload, p, n), self.pool.submit(self._offload, q, n)]
        for f in futs:
            f.result()

    def _check_onboard(self, p: int, m: Match, promote: bool) -> None:
        out = np.zeros((m.num_blocks, self.bb), np.uint8)
        res = self.mgr.onboard(m, ContiguousBlocks(out, self.mgr.layout), promote=promote)
        assert res.loaded <= m.num_blocks
        for i in range(res.loaded):
            assert np.array_equal(out[i], self.data[p][i]), (
                f"wrong KV: prompt {p} block {i} from tier {m.tiers[i]}")
        self.loaded_blocks += res.loaded

    @rule(p=st.integers(0, PROMPTS - 1), promote=st.booleans())
    def match_and_onboard(self, p: int, promote: bool) -> None:
        with self.mgr.match_prefix(self.hashes[p]) as m:
            assert m.hashes == self.hashes[p][: m.num_blocks], "a match is a strict prefix"
            self._check_onboard(p, m, promote)

    @precondition(lambda self: len(self.held) < 3)
    @rule(p=st.integers(0, PROMPTS - 1))
    def hold_a_match(self, p: int) -> None:
        self.held.append((p, self.mgr.match_prefix(self.hashes[p])))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def onboard_a_held_match(self, data: st.DataObject) -> None:
        p, m = self.held[data.draw(st.integers(0, len(self.held) - 1))]
        self._check_onboard(p, m, promote=True)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release_a_held_match(self, data: st.DataObject) -> None:
        _, m = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        m.release()

    @rule()
    def flush(self) -> None:
        assert self.mgr.flush(timeout=30)

    # -- faults ----------------------------------------------------------------------------
    @rule(mode=st.sampled_from(["raise", "short"]), n=st.integers(1, 3))
    def disk_writes_fail(self, mode: str, n: int) -> None:
        self.faults.write_mode, self.faults.writes_left = mode, n

    @rule(mode=st.sampled_from(["raise", "short"]), n=st.integers(1, 3))
    def disk_reads_fail(self, mode: str, n: int) -> None:
        self.faults.read_mode, self.faults.reads_left = mode, n

    @rule(pick=st.integers(0, 1000), byte=st.integers(0, 10**6))
    def a_disk_block_is_corrupted(self, pick: int, byte: int) -> None:
        # Which slots hold blocks depends on the background cascade's timing: draw
        # first, then choose among them, so hypothesis replays the same draws.
        self.mgr.flush(timeout=30)
        reg = self.mgr.chain[1].registry
        slots = [s for s in range(reg.capacity) if reg.state_at(s) == SlotState.REGISTERED]
        if not slots:
            return
        stripe, local = self.disk._locate(slots[pick % len(slots)])
        with open(stripe.path, "r+b") as f:
            off = self.disk.geom.data_offset(local) + byte % self.bb
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x5A]))

    # -- what must hold ------------------------------------------------------------------
    @invariant()
    def every_block_is_in_one_slot_per_tier(self) -> None:
        for ts in self.mgr.chain:
            reg = ts.registry
            keys = [reg.key_at(s) for s in range(reg.capacity) if reg.state_at(s) != SlotState.FREE]
            assert len(keys) == len(set(keys))

    def teardown(self) -> None:
        try:
            for _, m in self.held:
                m.release()
            self.held = []
            assert self.mgr.flush(timeout=30), "the cascade did not finish"
            st_ = self.mgr.stats()
            assert st_["pinned_blocks"] == 0, "pins left after every match was released"
            for ts in self.mgr.chain:
                reg = ts.registry
                writing = [s for s in range(reg.capacity) if reg.state_at(s) == SlotState.WRITING]
                assert not writing, f"tier {ts.name}: slots {writing} left being written"
        finally:
            self.pool.shutdown()
            self.mgr.close()
            shutil.rmtree(self.dir, ignore_errors=True)


DataPathMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDataPath = DataPathMachine.TestCase
