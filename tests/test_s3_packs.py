"""Packed objects (several blocks in one object) and eviction, against a real moto
server on 127.0.0.1: evicting one block never makes a block this instance still
holds unreadable, the pack goes once none of its blocks is held, and the pack
bookkeeping stays bounded."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from kvbm import Namespace  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from s3server import BUCKET, MotoServer  # noqa: E402
from test_s3_tier import BB, LAYOUT, blocks, keys, make_tier  # noqa: E402


@pytest.fixture(scope="module")
def server() -> Iterator[MotoServer]:
    s = MotoServer()
    s.start()
    yield s
    s.stop()


def listed(server: MotoServer, ns: str) -> list[str]:
    """The object names under the test's namespace."""
    hexns = Namespace(model_id=ns, layout_digest=LAYOUT.digest).hex
    out = server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"t/{hexns}/")
    return [o["Key"] for o in out.get("Contents", [])]


def read_back(server: MotoServer, ns: str, ks: list[Any], want: np.ndarray) -> None:
    """A fresh instance (empty existence cache) reads ``ks`` byte-exact: the objects
    are in the bucket, not merely remembered."""
    fresh = make_tier(server, ns)
    out = np.zeros((len(ks), BB), np.uint8)
    try:
        assert fresh.read(range(len(ks)), ks, list(out)) == [True] * len(ks)
        assert np.array_equal(out, want)
    finally:
        fresh.close()


# -- a: evicting one block keeps the blocks still held readable ---------------------
def test_evicting_the_first_block_of_a_pack_the_cache_forgot_keeps_its_siblings_readable(
    server: MotoServer,
) -> None:
    # An existence cache of 2 forgets where the first blocks of a 4-block pack live.
    ns = "pack-forgot"
    tier = make_tier(server, ns, pack_blocks=4, delete_on_evict=True, exist_cache_size=2)
    data, ks = blocks(4, 30), keys(4, 30)
    assert tier.write(range(4), ks, list(data)) == [True] * 4
    tier.discard([0], ks[:1])
    tier.close()  # waits for any background delete
    read_back(server, ns, ks[1:], data[1:])


def test_evicting_a_block_adopted_from_another_instances_pack_keeps_its_siblings_readable(
    server: MotoServer,
) -> None:
    ns = "pack-adopted"
    writer = make_tier(server, ns, pack_blocks=4)
    data, ks = blocks(8, 31), keys(8, 31)
    assert writer.write(range(8), ks, list(data)) == [True] * 8
    writer.close()
    reader = make_tier(server, ns, delete_on_evict=True, exist_cache_size=4)
    assert reader.probe(ks[:4]) == [True] * 4  # adopted from the other instance's pack
    assert reader.probe(ks[4:]) == [True] * 4  # and the cache forgets where the first lives
    reader.discard([0], ks[:1])
    reader.close()
    read_back(server, ns, ks[1:4], data[1:4])


def test_block_found_again_by_probe_keeps_its_pack_when_its_siblings_are_evicted(
    server: MotoServer,
) -> None:
    ns = "pack-refound"
    tier = make_tier(server, ns, pack_blocks=4, delete_on_evict=True)
    data, ks = blocks(4, 32), keys(4, 32)
    assert tier.write(range(4), ks, list(data)) == [True] * 4
    tier.discard([0], ks[:1])
    assert tier.probe(ks[:1]) == [True]  # the registry adopts it again, in slot 4
    tier.discard([1, 2, 3], ks[1:])
    tier.close()
    read_back(server, ns, ks[:1], data[:1])


def test_block_saved_again_alone_after_eviction_keeps_its_packs_siblings_readable(
    server: MotoServer,
) -> None:
    ns = "pack-resaved"
    tier = make_tier(server, ns, pack_blocks=4, delete_on_evict=True)
    data, ks = blocks(4, 33), keys(4, 33)
    assert tier.write(range(4), ks, list(data)) == [True] * 4
    tier.discard([0], ks[:1])
    # Saved again on its own: its name is the pack's, so the conditional PUT finds it.
    assert tier.write([4], ks[:1], [data[0]]) == [True]
    tier.discard([4], ks[:1])
    tier.close()
    read_back(server, ns, ks[1:], data[1:])


def test_evicting_a_pack_keeps_the_older_pack_its_pointer_could_not_replace(
    server: MotoServer,
) -> None:
    ns = "pack-pointer-taken"
    tier = make_tier(server, ns, pack_blocks=3, delete_on_evict=True)
    data, ks = blocks(4, 37), keys(4, 37)
    x, q1, w, y = ks
    assert tier.write([0, 1], [x, q1], [data[0], data[1]]) == [True] * 2  # pack [x, q1]
    tier.discard([0], [x])
    # x is saved again in the middle of a new pack [w, x, y]: its pointer's name is
    # the older pack's, which stays (q1 is still held).
    assert tier.write([2, 3, 4], [w, x, y], [data[2], data[0], data[3]]) == [True] * 3
    tier.discard([2, 3, 4], [w, x, y])
    tier.close()
    read_back(server, ns, [q1], data[1:2])


def test_pack_and_its_pointers_go_once_none_of_its_blocks_is_held(server: MotoServer) -> None:
    # Guards the fixes above against keeping every pack: the last release deletes it.
    ns = "pack-last"
    tier = make_tier(server, ns, pack_blocks=4, delete_on_evict=True)
    data, ks = blocks(4, 34), keys(4, 34)
    assert tier.write(range(4), ks, list(data)) == [True] * 4
    tier.discard([0], ks[:1])
    assert tier.probe(ks[:1]) == [True]
    tier.discard([1, 2], ks[1:3])
    out = np.zeros(BB, np.uint8)
    assert tier.read([4], ks[:1], [out]) == [True] and np.array_equal(out, data[0])
    tier.discard([4], ks[:1])
    assert tier.read([3], ks[3:], [out]) == [True] and np.array_equal(out, data[3])
    assert listed(server, ns)  # block 3 is still held
    tier.discard([3], ks[3:])
    tier.close()  # waits for the background delete
    assert listed(server, ns) == []
    assert tier.stats()["deletes"] == 4  # the pack and its three pointers


def test_stale_discard_of_a_block_saved_again_in_another_slot_keeps_its_pack(
    server: MotoServer,
) -> None:
    ns = "pack-stale"
    tier = make_tier(server, ns, pack_blocks=2, delete_on_evict=True)
    data, ks = blocks(2, 35), keys(2, 35)
    assert tier.write([0, 1], ks, list(data)) == [True] * 2
    tier.discard([1], ks[1:])
    # Block 0 was evicted from slot 0 and saved again into slot 5 before the
    # discard of slot 0 ran: that discard is stale and must not delete the pack.
    assert tier.write([5], ks[:1], [data[0]]) == [True]
    tier.discard([0], ks[:1])
    tier.close()
    read_back(server, ns, ks[:1], data[:1])


# -- b: bounded bookkeeping ------------------------------------------------------------
def largest_container(obj: object, depth: int = 3) -> tuple[int, str]:
    """The longest dict, set or list reachable from ``obj`` through attributes of the
    s3 tier's own objects (the tier, its caches and books), and where it is."""
    best = (0, "")
    seen: set[int] = set()

    def walk(o: object, path: str, d: int) -> None:
        nonlocal best
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, (dict, set, frozenset, list)):
            if len(o) > best[0]:
                best = (len(o), path)
            if isinstance(o, dict) and d > 0:
                for k, v in list(o.items())[:64]:
                    walk(v, f"{path}[{k!r}]", d - 1)
            return
        if d <= 0 or not type(o).__module__.startswith("kvbm_tiers_s3"):
            return
        attrs = dict(getattr(o, "__dict__", {}))
        for name in getattr(type(o), "__slots__", ()):
            if hasattr(o, name):
                attrs[name] = getattr(o, name)
        for name, v in attrs.items():
            walk(v, f"{path}.{name}", d - 1)

    walk(obj, "tier", depth)
    return best


@pytest.mark.parametrize("delete_on_evict", [False, True])
def test_pack_bookkeeping_stays_bounded(server: MotoServer, delete_on_evict: bool) -> None:
    # 120 two-block packs, never discarded (without delete_on_evict nothing ever is;
    # with it, the registry may forget blocks without a discard reaching the tier).
    ns = f"pack-bounded-{delete_on_evict}"
    tier = make_tier(server, ns, pack_blocks=2, delete_on_evict=delete_on_evict,
                     exist_cache_size=16, num_blocks=32, max_concurrency=8)
    n = 240
    data, ks = blocks(n, 36), keys(n, 36)
    for s in range(0, n, 8):
        idx = range(s, s + 8)
        assert tier.write([i % 32 for i in idx], ks[s : s + 8], list(data[s : s + 8])) == [True] * 8
    size, where = largest_container(tier)
    assert size <= 80, f"{where} holds {size} entries after {n // 2} packs"
    tail = ks[-2:]
    out = np.zeros((2, BB), np.uint8)
    assert tier.read([0, 1], tail, list(out)) == [True, True]
    assert np.array_equal(out, data[-2:])
    tier.close()
