"""The remote tier's speculative first READ (``speculative_reads``, checksum mode).

A batch's first blocks are READ from the addresses their last lease gave while the
new lease request is on its way. A block is kept only if the reply puts it at the same
address and its bytes match the sum the peer took under the pin; otherwise it is READ
again under the lease, or is a miss, never stale data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("nixl._api", reason="nixl is not installed: pip install 'kvbm[remote]'")
pytest.importorskip("msgpack", reason="msgpack is not installed: pip install 'kvbm[remote]'")

from remote_pair import config as _config  # noqa: E402
from remote_pair import flip_after_lease, rewrite_before_lease  # noqa: E402
from remote_pair import offload as _offload  # noqa: E402
from remote_pair import onboard as _onboard  # noqa: E402

from kvbm import KvBlockManager  # noqa: E402

# 4 KiB blocks, READs of two blocks: the speculative READ covers the whole first step (all 4).
READER = {"verify_bytes": 2 * 4096}


def _stats(mgr: KvBlockManager) -> dict[str, Any]:
    return mgr.chain[-1].tier.stats()  # type: ignore[no-any-return]


@pytest.fixture
def pair(tmp_path: Path) -> Any:
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "checksum_cache": False}))
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, **READER}))
    yield a, b
    a.close()
    b.close()


def test_blocks_read_again_are_read_before_their_lease_reply_byte_exact(pair: Any) -> None:
    a, b = pair
    tokens, data = _offload(a, 4, 31)
    assert _onboard(b, tokens, 4)[0] == 4  # the first read learns the addresses
    assert _stats(b)["speculative_blocks"] == 0
    loaded, out = _onboard(b, tokens, 4)
    assert loaded == 4
    assert np.array_equal(out, data)
    assert _stats(b)["speculative_blocks"] == 4
    assert _stats(b)["speculative_misses"] == 0  # kept, not READ a second time
    assert _stats(b)["checksum_failures"] == 0


def test_block_the_reply_puts_elsewhere_is_read_again_under_the_lease(pair: Any) -> None:
    a, b = pair
    tokens, data = _offload(a, 4, 32)
    assert _onboard(b, tokens, 4)[0] == 4
    reader = b.chain[-1].tier._reader
    keys = b.hash_tokens(tokens)
    # Remember block 0 at block 3's slot: the speculative READ fetches the wrong bytes.
    (k0,) = [k for k in reader._addrs if k[1] == bytes(keys[0])]
    (k3,) = [k for k in reader._addrs if k[1] == bytes(keys[3])]
    reader._addrs[k0] = reader._addrs[k3]
    loaded, out = _onboard(b, tokens, 4)
    assert loaded == 4
    assert np.array_equal(out, data)
    st = _stats(b)
    assert st["speculative_misses"] == 1
    assert st["checksum_failures"] == 0


# Block 1: in the first READ (hashed on the verifier); 2 and 3: the last READ, whose
# hashing is split (2 on the verifier, 3 on the reading thread).
@pytest.mark.parametrize("bad", [1, 2, 3], ids=["first-read", "last-read-verifier", "last-read-inline"])
def test_slot_rewritten_after_the_speculative_read_and_before_the_pin_is_a_miss(
    pair: Any, monkeypatch: pytest.MonkeyPatch, bad: int
) -> None:
    a, b = pair
    tokens, data = _offload(a, 4, 33)
    assert _onboard(b, tokens, 4)[0] == 4
    rewrite_before_lease(monkeypatch, a, tokens, bad, wait_s=0.5)
    loaded, out = _onboard(b, tokens, 4)
    assert _stats(b)["speculative_blocks"] == 4
    assert loaded == bad  # the block held the old bytes: a miss, and the prefix stops there
    assert np.array_equal(out[:bad], data[:bad])
    assert _stats(b)["checksum_failures"] == 1


def test_speculative_reads_off_reads_only_after_the_lease_reply(tmp_path: Path) -> None:
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    b = KvBlockManager.from_config(
        _config({"rendezvous_dir": rdir, **READER, "speculative_reads": False}))
    try:
        tokens, data = _offload(a, 3, 34)
        for _ in range(2):
            loaded, out = _onboard(b, tokens, 3)
            assert loaded == 3
            assert np.array_equal(out, data)
        assert _stats(b)["speculative_blocks"] == 0
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("bad", [0, 3], ids=["verifier-half", "inline-half"])
def test_block_changed_after_its_lease_in_either_half_of_the_last_read_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: int
) -> None:
    # One READ of 4 blocks, not speculative: the batch's last READ, whose hashing is
    # split between the verifier (blocks 0-1) and the reading thread (blocks 2-3).
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "checksum_cache": False}))
    b = KvBlockManager.from_config(_config(
        {"rendezvous_dir": rdir, "verify_bytes": 4 * 4096, "speculative_reads": False}))
    try:
        tokens, data = _offload(a, 4, 35)
        flip_after_lease(monkeypatch, a, tokens, bad)
        loaded, out = _onboard(b, tokens, 4)
        assert loaded == bad
        assert np.array_equal(out[:bad], data[:bad])
        assert _stats(b)["checksum_failures"] == 1
    finally:
        a.close()
        b.close()
