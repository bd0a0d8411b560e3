"""A writer killed with SIGKILL mid-write: no torn block is ever served or published,
and its temporaries are gone after the next start's janitor pass."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm import Namespace
from kvbm.blockfile import HEADER_BYTES, padded_bytes, unpack_header
from kvbm.layout import BlockLayout, ModelSpec
from kvbm.tier import TierContext
from kvbm_tiers_fs.config import FsTierConfig
from kvbm_tiers_fs.tier import FsTier

# Llama-3-8B's shape with 32-token pages: 4 MiB blocks, so a write takes long enough
# (with fsync) to be caught in the middle.
SPEC = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "name": "big"}
PAGE = 32
#: The writer stops by itself after this many blocks (512 MiB), killed or not.
MAX_BLOCKS = 128
LAYOUT = BlockLayout(ModelSpec(**SPEC), PAGE)  # type: ignore[arg-type]
BB = LAYOUT.bytes_per_block

WRITER = """
import json, sys
import numpy as np
from kvbm import Namespace
from kvbm.layout import BlockLayout, ModelSpec
from kvbm.tier import TierContext
from kvbm_tiers_fs.config import FsTierConfig
from kvbm_tiers_fs.tier import FsTier
spec, page, path, first, last = (json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                  int(sys.argv[4]), int(sys.argv[5]))
layout = BlockLayout(ModelSpec(**spec), page)
cfg = FsTierConfig.model_validate({"path": path, "capacity": "100GiB", "janitor": False,
                                   "fsync": True, "io_threads": 4})
tier = FsTier(cfg, TierContext("fs", Namespace(model_id="crash", layout_digest=layout.digest),
                               layout, 1 << 16))
base = np.random.default_rng(0).integers(0, 256, layout.bytes_per_block, dtype=np.uint8)
i = first
while i < last:  # until killed, or a bounded number of blocks
    ks = [(i + j).to_bytes(16, "little") for j in range(4)]
    tier.write(list(range(i, i + 4)), ks, [base ^ np.uint8((i + j) & 255) for j in range(4)])
    i += 4
"""


def make_tier(path: Path, **over: Any) -> FsTier:
    cfg = FsTierConfig.model_validate({"type": "fs", "name": "fs", "path": str(path),
                                       "capacity": "100GiB", "janitor": False, **over})
    ns = Namespace(model_id="crash", layout_digest=LAYOUT.digest)
    return FsTier(cfg, TierContext("fs", ns, LAYOUT, 1 << 16))


def expected(key: bytes, base: np.ndarray) -> np.ndarray:
    return base ^ np.uint8(int.from_bytes(key, "little") & 255)


def key_index(f: Path) -> int:
    """The writer's block number behind a block or temporary file's name."""
    return int.from_bytes(bytes.fromhex(f.name.lstrip(".")[:32]), "little")


def temporaries(d: Path) -> list[Path]:
    """Writes in progress (not a starting tier's O_DIRECT test file)."""
    return [p for p in d.rglob("*.tmp") if not p.name.startswith(".probe.")]


def check_published(ns: Path, base: np.ndarray) -> int:
    """Every name holds a whole, intact block, looked at on disk (not through the
    tier's own checks); returns how many there are."""
    published = sorted(ns.rglob("*.kvb"))
    for f in published:
        raw = np.fromfile(f, np.uint8)
        assert raw.size == padded_bytes(BB), f"torn block published: {f} has {raw.size} bytes"
        h = unpack_header(memoryview(raw[:HEADER_BYTES].tobytes()))
        k = bytes.fromhex(f.name[:32])
        assert h is not None and h.key == k, f
        assert np.array_equal(raw[HEADER_BYTES : HEADER_BYTES + BB], expected(k, base)), f
    return len(published)


def kill_mid_write(path: Path, ns: Path, first: int) -> bool:
    """Start a writer of blocks ``first``…, SIGKILL it while one of its blocks is being
    written; True if it was killed then (a temporary of its own, or a short block
    file, was there just before)."""
    child = subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(SPEC), str(PAGE),
                              str(path), str(first), str(first + MAX_BLOCKS)])
    mine = range(first, first + MAX_BLOCKS)
    caught = False
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            names = [f for f in ns.rglob("*.kvb") if key_index(f) in mine] if ns.exists() else []
            temps = [f for f in temporaries(ns) if key_index(f) in mine] if names else []
            # Mid-write: a temporary of its own, or (a writer writing in place, which
            # this test must catch too) a block file not yet whole.
            short = [f for f in names if f.exists() and f.stat().st_size < padded_bytes(BB)]
            if len(names) >= 4 and (temps or short):
                os.kill(child.pid, signal.SIGKILL)
                caught = True
                break
            time.sleep(0.002)
    finally:
        # Never leave a writer behind: one that outlived its test filled the disk once.
        if child.poll() is None:
            child.kill()
        child.wait(30)
    return caught and child.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkilled_writer_leaves_no_torn_block_and_its_temporaries_go_at_next_start(
    tmp_path: Path,
) -> None:
    base = np.random.default_rng(0).integers(0, 256, BB, dtype=np.uint8)
    reader = make_tier(tmp_path)
    ns = reader.directory
    served = wrong = 0
    stop = threading.Event()

    def read_while_writing() -> None:
        nonlocal served, wrong
        out = np.zeros(BB, np.uint8)
        while not stop.is_set():
            for f in list(ns.rglob("*.kvb"))[-8:]:
                k = bytes.fromhex(f.name[:32])
                if reader.read([0], [k], [out]) == [True]:
                    served += 1
                    wrong += not np.array_equal(out, expected(k, base))

    th = threading.Thread(target=read_while_writing)
    th.start()
    left = False
    try:
        for attempt in range(5):  # a kill can land just after a rename: try again
            killed = kill_mid_write(tmp_path, ns, first=1000 * attempt)
            check_published(ns, base)
            left = killed and bool(temporaries(ns))
            if left:
                break
    finally:
        stop.set()
        th.join()
    assert served > 0 and wrong == 0
    # The reader never met a file under a block's name that was not a whole block.
    assert reader.stats()["bad_files"] == 0 and reader.stats()["read_errors"] == 0
    assert check_published(ns, base) > 0
    assert left, "no writer was killed with a temporary in flight in 5 tries"
    # The next start's janitor pass removes the dead writer's temporaries at once.
    nxt = make_tier(tmp_path, janitor=True)
    try:
        deadline = time.monotonic() + 30
        while nxt.stats()["janitor_passes"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert temporaries(ns) == []
        assert nxt.stats()["janitor"]["temps_removed"] >= 1
        k = bytes.fromhex(sorted(ns.rglob("*.kvb"))[-1].name[:32])
        out = np.zeros(BB, np.uint8)
        assert nxt.read([0], [k], [out]) == [True] and np.array_equal(out, expected(k, base))
    finally:
        nxt.close()
        reader.close()


def test_a_temporary_is_never_found_or_read(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    try:
        k = (7).to_bytes(16, "little")
        d, _ = t.path_of(k).rsplit("/", 1)
        (t.directory / d).mkdir(parents=True, mode=0o700)
        tmp = t.directory / d / f".{k.hex()}.host.1.ab.tmp"
        tmp.write_bytes(b"\1" * (padded_bytes(BB) // 2))
        assert t.probe([k]) == [False]
        assert t.read([0], [k], [np.zeros(BB, np.uint8)]) == [False]
    finally:
        t.close()
