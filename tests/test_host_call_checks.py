"""An offload's index and hash checks: each bad item refused by name (a bool or float
index, a range past the source, a short hash), numpy integer indices and a 16-byte bytes
subclass taken; blocks stored by such indices come back byte for byte."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvbm import KvBlockManager, KvbmError
from kvbm.layout import ContiguousBlocks

from conftest import PAGE, SMALL_MODEL

N = 8


def _mgr() -> KvBlockManager:
    return KvBlockManager.from_config({"model": SMALL_MODEL, "page_size": PAGE,
                                       "tiers": [{"type": "host", "num_blocks": 16}]})


def _src(m: KvBlockManager) -> tuple[ContiguousBlocks, np.ndarray]:
    data = np.random.default_rng(0).integers(0, 256, (N, m.layout.bytes_per_block),
                                             dtype=np.uint8)
    return ContiguousBlocks(data, m.layout), data


@pytest.mark.parametrize(("indices", "msg"), [
    ([0, True, 2, 3], "offload: indices[1] is bool True, not a block index"),
    ([0, 1, 2.0, 3], "offload: indices[2] is float 2.0, not a block index"),
    (range(6, 10), "block index 8 is out of range [0, 8)"),
    (range(-1, 3), "block index -1 is out of range [0, 8)"),
])
def test_an_index_the_batch_check_cannot_pass_is_named_and_nothing_is_stored(
        indices: Any, msg: str) -> None:
    with _mgr() as m:
        src, _ = _src(m)
        hs = m.hash_tokens(list(range(4 * PAGE)))
        with pytest.raises(KvbmError) as e:
            m.offload(hs, src, indices=indices)
        assert str(e.value) == msg
        with m.match_prefix(hs) as match:
            assert match.num_blocks == 0


def test_numpy_integer_indices_store_the_blocks_they_name() -> None:
    with _mgr() as m:
        src, data = _src(m)
        hs = m.hash_tokens(list(range(4 * PAGE)))
        assert m.offload(hs, src, indices=list(np.array([7, 5, 3, 1]))).stored == 4
        out = np.zeros((4, m.layout.bytes_per_block), dtype=np.uint8)
        with m.match_prefix(hs) as match:
            assert m.onboard(match, ContiguousBlocks(out, m.layout)).loaded == 4
        assert np.array_equal(out, data[[7, 5, 3, 1]])


def test_a_hash_list_with_a_bytes_subclass_item_goes_to_the_named_check() -> None:
    class Other(bytes):
        pass

    with _mgr() as m:
        src, data = _src(m)
        hs = m.hash_tokens(list(range(2 * PAGE)))
        # A 16-byte subclass passes the per-item check (it is bytes): stored as bytes.
        assert m.offload([hs[0], Other(hs[1])], src).stored == 2
        with pytest.raises(KvbmError, match=r"offload: hashes\[1\] is bytes b'ab', not a 16-byte"):
            m.offload([hs[0], b"ab"], src)
