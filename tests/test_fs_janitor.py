"""The fs tier's janitor on real files: the byte budget, temporaries, the pass lock."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvbm import ContiguousBlocks, KvBlockManager, Namespace
from kvbm.blockfile import padded_bytes
from kvbm.layout import BlockLayout, ModelSpec
from kvbm.tier import TierContext
from kvbm_tiers_fs._paths import HOST_TAG
from kvbm_tiers_fs.config import FsTierConfig
from kvbm_tiers_fs.tier import FsTier

PAGE = 16
MODEL = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float16"}
LAYOUT = BlockLayout(ModelSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16",
                               name="tiny"), PAGE)
BB = LAYOUT.bytes_per_block
FB = padded_bytes(BB)


def make_tier(path: Path, model: str = "t", **over: Any) -> FsTier:
    cfg = FsTierConfig.model_validate({"type": "fs", "name": "fs", "path": str(path),
                                       "capacity": 10 * FB, "janitor": False, **over})
    ns = Namespace(model_id=model, layout_digest=LAYOUT.digest)
    return FsTier(cfg, TierContext("fs", ns, LAYOUT, cfg.resolve_num_blocks(BB)))


def blocks(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, BB), dtype=np.uint8)


def keys(n: int, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed + 1000)
    return [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(n)]


def block_files(d: Path) -> list[Path]:
    return sorted(d.rglob("*.kvb"))


def age(f: Path, seconds_ago: float, atime_ago: float | None = None) -> None:
    now = time.time_ns()
    a = now - int((seconds_ago if atime_ago is None else atime_ago) * 1e9)
    os.utime(f, ns=(a, now - int(seconds_ago * 1e9)))


def temp_in(t: FsTier, name: str, seconds_ago: float = 0) -> Path:
    d = t.directory / "ab" / "cd"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = d / name
    f.write_bytes(b"\0" * 5000)  # a torn write
    age(f, seconds_ago)
    return f


# -- the budget ------------------------------------------------------------------------
def test_instances_together_pass_the_budget_and_the_janitor_brings_it_back_under(tmp_path: Path) -> None:
    tiers = [make_tier(tmp_path) for _ in range(3)]  # each within its own 10-file budget
    try:
        for i, t in enumerate(tiers):
            t.write(list(range(8)), keys(8, 10 * i), list(blocks(8, i)))
        d = tiers[0].directory
        assert len(block_files(d)) * FB == 24 * FB > 10 * FB
        rep = tiers[0].janitor()
        assert rep.ran and rep.files == 24 and rep.bytes == 24 * FB and rep.budget == 10 * FB
        left = len(block_files(d))
        assert left * FB <= 0.9 * 10 * FB and left == 9 and rep.removed_files == 15
    finally:
        for t in tiers:
            t.close()


def test_janitor_removes_nothing_under_the_budget(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    try:
        t.write(list(range(10)), keys(10, 1), list(blocks(10, 1)))
        rep = t.janitor()
        assert rep.files == 10 and rep.removed_files == 0 and len(block_files(t.directory)) == 10
    finally:
        t.close()


def test_janitor_removes_the_least_recently_read_first(tmp_path: Path) -> None:
    t = make_tier(tmp_path, capacity=4 * FB, janitor_low_water=0.5)
    try:
        ks = keys(6, 2)
        t.write(list(range(6)), ks, list(blocks(6, 2)))
        paths = [t.directory / t.path_of(k) for k in ks]
        for i, p in enumerate(paths):  # written long ago, oldest first
            age(p, 1000 - i)
        age(paths[0], 1000, atime_ago=1)  # oldest written, but read a second ago
        age(paths[1], 999, atime_ago=2)
        t.janitor()
        assert {p for p in paths if p.exists()} == {paths[0], paths[1]}
    finally:
        t.close()


def test_janitor_by_mtime_removes_the_oldest_written_first(tmp_path: Path) -> None:
    t = make_tier(tmp_path, capacity=4 * FB, janitor_low_water=0.5, janitor_by="mtime")
    try:
        ks = keys(6, 3)
        t.write(list(range(6)), ks, list(blocks(6, 3)))
        paths = [t.directory / t.path_of(k) for k in ks]
        for i, p in enumerate(paths):
            age(p, 1000 - i, atime_ago=1)  # all read recently: mtime decides
        t.janitor()
        assert {p for p in paths if p.exists()} == {paths[4], paths[5]}
    finally:
        t.close()


def test_directory_budget_counts_every_namespace(tmp_path: Path) -> None:
    a = make_tier(tmp_path, model="a", capacity=100 * FB, directory_budget=10 * FB)
    b = make_tier(tmp_path, model="b", capacity=100 * FB)
    try:
        b.write(list(range(8)), keys(8, 4), list(blocks(8, 4)))
        a.write(list(range(8)), keys(8, 5), list(blocks(8, 5)))
        for p in block_files(b.directory):
            age(p, 500)  # b's blocks are the older ones
        rep = a.janitor()
        assert rep.scope == "directory" and rep.files == 16
        assert len(block_files(a.directory)) == 8 and len(block_files(b.directory)) == 1
    finally:
        a.close()
        b.close()


def test_readers_see_misses_not_errors_when_the_janitor_removes_their_blocks(tmp_path: Path) -> None:
    # Registries of 20 blocks each (num_blocks), a directory budget of 6 files (capacity).
    fs = {"type": "fs", "path": str(tmp_path), "capacity": 6 * FB, "num_blocks": 20,
          "janitor": False, "janitor_low_water": 0.5}
    cfg = {"model": MODEL, "page_size": PAGE, "tiers": [{"type": "host", "num_blocks": 2}, fs]}
    writers = [KvBlockManager.from_config(cfg) for _ in range(2)]
    reader = KvBlockManager.from_config(cfg)
    try:
        prompts = [list(range(1000 * w, 1000 * w + 5 * PAGE)) for w in range(2)]
        for w, mgr in enumerate(writers):
            mgr.offload(mgr.hash_tokens(prompts[w]), ContiguousBlocks(blocks(5, w), mgr.layout))
            mgr.flush()
        matches = [reader.match_prefix(p) for p in prompts]
        assert [m.num_blocks for m in matches] == [5, 5]
        fs_tier = writers[0].executor.tiers[1]
        assert isinstance(fs_tier, FsTier)
        rep = fs_tier.janitor()  # 10 files over a budget of 6: down to 3
        assert rep.removed_files == 7
        loaded = []
        for w, m in enumerate(matches):
            out = np.zeros((5, BB), np.uint8)
            r = reader.onboard(m, ContiguousBlocks(out, reader.layout))
            # Whatever was loaded is the right bytes; the rest is a miss, not an exception.
            assert np.array_equal(out[: r.loaded], blocks(5, w)[: r.loaded])
            loaded.append(r.loaded)
            m.release()
        assert sum(loaded) < 10
        st = reader.stats()["tiers"]["fs"]
        assert st["missing_files"] >= 1 and st["read_errors"] == 0
    finally:
        for mgr in [*writers, reader]:
            mgr.close()


# -- temporaries -------------------------------------------------------------------------
def test_janitor_removes_temporaries_older_than_the_age_limit(tmp_path: Path) -> None:
    t = make_tier(tmp_path, temp_max_age_s=60)
    try:
        old = temp_in(t, f".{'aa' * 16}.otherhost.123.beef.tmp", seconds_ago=120)
        young = temp_in(t, f".{'bb' * 16}.otherhost.124.beef.tmp", seconds_ago=1)
        rep = t.janitor()
        assert not old.exists() and young.exists()
        assert rep.temps_seen == 2 and rep.temps_removed == 1
    finally:
        t.close()


def test_janitor_removes_a_dead_local_writers_temporary_at_once(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True, check=True)
    dead = int(p.stdout)  # exited: its pid is free (and not reused this fast)
    t = make_tier(tmp_path)
    try:
        f = temp_in(t, f".{'cc' * 16}.{HOST_TAG}.{dead}.beef.tmp")
        t.janitor()
        assert not f.exists()
    finally:
        t.close()


def test_janitor_keeps_a_live_local_writers_young_temporary(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    t = make_tier(tmp_path)
    try:
        f = temp_in(t, f".{'dd' * 16}.{HOST_TAG}.{live.pid}.beef.tmp")
        t.janitor()
        assert f.exists()
    finally:
        live.kill()
        live.wait()
        t.close()


def test_janitor_ignores_files_that_are_not_its_own(tmp_path: Path) -> None:
    t = make_tier(tmp_path, capacity=FB, janitor_low_water=0.1)
    try:
        other = t.directory / "notes.txt"
        other.write_text("x" * 10 * FB)
        age(other, 10**6)
        rep = t.janitor()
        assert other.exists() and rep.files == 0
    finally:
        t.close()


# -- running -----------------------------------------------------------------------------
def test_a_pass_is_skipped_while_another_instance_runs_one(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    try:
        # Another open file description holds the flock, as another instance's would.
        other = os.open(t.directory / ".janitor.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(other, fcntl.LOCK_EX)
        try:
            assert t.janitor().ran is False
        finally:
            os.close(other)
        assert t.janitor().ran is True
    finally:
        t.close()


def test_background_janitor_runs_at_start_and_on_its_interval(tmp_path: Path) -> None:
    t = make_tier(tmp_path, janitor=True, janitor_interval_s=0.2)
    try:
        deadline = time.monotonic() + 10
        while t.stats()["janitor_passes"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.stats()["janitor_passes"] >= 3 and t.stats()["janitor"]["ran"]
    finally:
        t.close()
    passes = t.janitor_passes
    time.sleep(0.5)
    assert t.janitor_passes == passes  # close() stopped it


def test_janitor_after_close_does_nothing(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    t.close()
    assert t.janitor().ran is False
