"""The remote tier's reads in pieces of a block (``verify_bytes`` under the block size).

Each block is READ in pieces and each piece hashed into the block's running xxh3 right
after its READ (while the bytes are still in cache); the block is checked at its last
piece. These tests pin down that the pieces land at the right offsets, that a change
in any one piece makes the block a miss, and that a piece whose READ failed cannot let
its block pass.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("nixl._api", reason="nixl is not installed: pip install 'kvbm[remote]'")
pytest.importorskip("msgpack", reason="msgpack is not installed: pip install 'kvbm[remote]'")
import xxhash  # noqa: E402
from remote_pair import config as _config  # noqa: E402
from remote_pair import flip_after_lease  # noqa: E402
from remote_pair import offload as _offload  # noqa: E402
from remote_pair import onboard as _onboard  # noqa: E402

from kvbm import KvBlockManager  # noqa: E402
from kvbm_tiers_remote._peers import RemoteStats  # noqa: E402
from kvbm_tiers_remote._reader import BlockReader, _Step  # noqa: E402
from kvbm_tiers_remote.config import RemoteTierConfig  # noqa: E402


def _pair(tmp_path: Path, piece: int) -> tuple[KvBlockManager, KvBlockManager]:
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "verify_bytes": piece}))
    assert a.block_bytes == 4096
    return a, b


@pytest.mark.parametrize("piece", [1024, 1536], ids=["4-equal-pieces", "last-piece-shorter"])
def test_blocks_read_in_pieces_are_byte_exact(tmp_path: Path, piece: int) -> None:
    a, b = _pair(tmp_path, piece)
    try:
        tokens, data = _offload(a, 5, 21)
        loaded, out = _onboard(b, tokens, 5)
        assert loaded == 5
        assert np.array_equal(out, data)
        assert b.chain[-1].tier.stats()["checksum_failures"] == 0
    finally:
        a.close()
        b.close()


def test_block_whose_middle_piece_changed_after_its_lease_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = _pair(tmp_path, 1024)
    try:
        tokens, data = _offload(a, 3, 22)
        flip_after_lease(monkeypatch, a, tokens, 1, at=2 * 1024 + 5)  # the third of four pieces
        loaded, out = _onboard(b, tokens, 3)
        assert loaded == 1  # the prefix stops at the bad block
        assert np.array_equal(out[0], data[0])
        assert b.chain[-1].tier.stats()["checksum_failures"] == 1
    finally:
        a.close()
        b.close()


BB = 4096


def _reader(piece: int) -> BlockReader:
    cfg = RemoteTierConfig(peers=["127.0.0.1:1"], verify_bytes=piece)
    return BlockReader("t", cfg, None, threading.RLock(), BB, None, RemoteStats())  # type: ignore[arg-type]


class _Peer:
    addr = "127.0.0.1:1"


@settings(max_examples=60, deadline=None)
@given(
    piece=st.sampled_from([512, 1000, 1024, 3000]),
    seed=st.integers(0, 2**32 - 1),
    flip=st.one_of(st.none(), st.integers(0, BB - 1)),
    failed=st.one_of(st.none(), st.integers(0, 7)),
)
def test_a_block_in_pieces_passes_only_when_every_piece_arrived_unchanged(
    piece: int, seed: int, flip: int | None, failed: int | None
) -> None:
    data = np.random.default_rng(seed).integers(0, 256, BB, dtype=np.uint8)
    want = xxhash.xxh3_64_intdigest(data)
    got = data.copy()
    if flip is not None:
        got[flip] ^= 0x01
    offs = list(range(0, BB, piece))
    reader, ok, bad = _reader(piece), [False], []  # type: ignore[var-annotated]
    unit = []
    for n, off in enumerate(offs):
        s = _Step()
        s.idx, s.sums, s.off, s.length = [0], [want], off, min(piece, BB - off)
        s.ok = n != failed
        unit.append(s)
    reader._hash_unit(unit, [got])  # what the lane that READ the pieces does
    reader._settle(_Peer(), unit, [b"k" * 16], [got], ok, bad)  # type: ignore[arg-type]
    arrived = failed is None or failed >= len(offs)
    assert ok == [flip is None and arrived]
    assert reader.stats.checksum_failures == (1 if flip is not None and arrived else 0)
    reader.close()
