"""Four processes, each its own KvBlockManager with an fs tier on one directory, write
and read overlapping prompts for a minute: every onboarded block is byte-exact, none
is wrong, and each process onboards blocks that only the others wrote.

The fs registries are small (64 blocks each, and a 64-block budget for the directory
with the janitor running every second), so blocks are evicted, deleted by their
writers and removed by janitors while other processes hold them in their registries:
files vanish under readers throughout, and must read as misses.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm.blockfile import padded_bytes

PROCESSES = 4
SECONDS = 60.0
PAGE = 16
MODEL = {"name": "conc", "num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "dtype": "float16"}
BB = 2 * 2 * PAGE * 2 * 64 * 2  # layers x K,V x tokens x heads x dims x bytes: 16 KiB
SYSTEM = list(range(4 * PAGE))  # a system prompt every conversation starts with
CONVERSATIONS = 12
MAX_BLOCKS = 12


def content(h: bytes) -> np.ndarray:
    """The bytes every process stores for block ``h``: a function of its hash alone."""
    return np.random.default_rng(int.from_bytes(h[:8], "little")).integers(0, 256, BB, dtype=np.uint8)


def prompt(c: int, blocks: int) -> list[int]:
    return SYSTEM + [100_000 * (c + 1) + j for j in range(blocks * PAGE)]


def worker(path: str, index: int, seconds: float, out: Any) -> None:
    """One instance: match, onboard and check, offload; report what it saw."""
    from kvbm import ContiguousBlocks, KvBlockManager

    cfg = {"model": MODEL, "page_size": PAGE,
           "tiers": [{"type": "host", "num_blocks": 8},
                     {"type": "fs", "path": path, "capacity": 64 * padded_bytes(BB),
                      "janitor_interval_s": 1.0}]}
    mgr = KvBlockManager.from_config(cfg)
    assert mgr.block_bytes == BB
    rng = random.Random(index)
    mine: set[bytes] = set()
    res = {"index": index, "rounds": 0, "onboarded": 0, "wrong": 0, "from_others": 0,
           "from_fs": 0, "error": ""}
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tokens = prompt(rng.randrange(CONVERSATIONS), rng.randint(1, MAX_BLOCKS))
            hashes = mgr.hash_tokens(tokens)
            with mgr.match_prefix(hashes) as m:
                n = m.num_blocks
                if n:
                    got = np.zeros((n, BB), np.uint8)
                    r = mgr.onboard(m, ContiguousBlocks(got, mgr.layout))
                    for i in range(r.loaded):
                        res["onboarded"] += 1
                        if not np.array_equal(got[i], content(hashes[i])):
                            res["wrong"] += 1
                        if m.tiers[i] == "fs":
                            res["from_fs"] += 1
                            res["from_others"] += hashes[i] not in mine
            data = np.stack([content(h) for h in hashes])
            mgr.offload(hashes, ContiguousBlocks(data, mgr.layout))
            mine.update(hashes)
            res["rounds"] += 1
        mgr.flush()
        res["fs"] = {k: v for k, v in mgr.stats()["tiers"]["fs"].items()
                     if isinstance(v, (int, float, str, bool))}
    except Exception as e:  # reported, so the parent's assertion names it
        res["error"] = repr(e)
    finally:
        mgr.close()
        out.put(res)


@pytest.mark.slow
def test_four_processes_share_one_directory_for_a_minute_byte_exact(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")  # a clean interpreter each, as separate instances are
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(str(tmp_path), i, SECONDS, q)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in procs:
            results.append(q.get(timeout=SECONDS + 180))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    results.sort(key=lambda r: r["index"])
    for r in results:  # shown with -s: how much each process did
        fs = r.get("fs", {})
        print(f"process {r['index']}: {r['rounds']} rounds, {r['onboarded']} blocks onboarded "
              f"({r['from_fs']} from fs, {r['from_others']} only others wrote), {r['wrong']} wrong; "
              f"fs: {fs.get('missing_files')} missing files, {fs.get('files_deleted')} deleted, "
              f"janitor passes {fs.get('janitor_passes')}")
    for r in results:
        assert r["error"] == "", r
        assert r["rounds"] > 10 and r["onboarded"] > 0, r
        assert r["wrong"] == 0, r
        assert r["from_others"] > 0, r  # it found blocks only the others wrote
        fs = r["fs"]
        assert fs["read_errors"] == 0 and fs["write_errors"] == 0 and fs["bad_files"] == 0, r
    # Writers' evictions and janitors kept the files near the 64-block budget.
    files = list(tmp_path.rglob("*.kvb"))
    assert len(files) <= 4 * 64
    assert list(tmp_path.rglob("*.tmp")) == []
