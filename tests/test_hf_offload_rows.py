"""An offload from the connector's cache into a memory tier's rows (``copy_out_rows``).

``CacheBlockSource.copy_out_rows`` gathers token-major K/V (a kvbm room's views) into
a tier's slots by one address table and one native copy; other tensors go through
``copy_out`` into views of the rows. Each test fails where the rows got other bytes
than the tensors themselves (and ``copy_out``) give, where a bad block or row number
was copied rather than refused, or where a stored prefix no longer reloads the plain
model's logprobs.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvbm import LayoutError  # noqa: E402
from kvbm.layout import BlockLayout, ModelSpec  # noqa: E402
from kvbm_hf._blocks import CacheBlockSource  # noqa: E402

PAGE = 4
LAYOUT = BlockLayout(ModelSpec(2, 2, 8, "float32"), PAGE)
BPB = LAYOUT.bytes_per_block


def _layers(token_major: bool, tokens: int = 5 * PAGE, room: int = 8 * PAGE,
            seed: int = 40) -> list[tuple[Any, Any]]:
    """Two layers' K/V of ``tokens`` tokens: token-major views of a longer room (kvbm's
    room: ``[1, room, heads, hd]`` memory seen as ``[1, heads, tokens, hd]``), or
    plain head-major tensors."""
    g = torch.Generator().manual_seed(seed)

    def kv() -> Any:
        if token_major:
            return torch.randn(1, room, 2, 8, generator=g).transpose(1, 2)[:, :, :tokens]
        return torch.randn(1, 2, tokens, 8, generator=g)

    return [(kv(), kv()) for _ in range(2)]


def _by_torch(layers: Any, ids: list[int]) -> list[np.ndarray]:
    """Each block's bytes in kvbm's order ``[layers, K|V, page, heads, hd]``, by torch
    alone (no kvbm code)."""
    return [torch.stack([torch.stack([t[0, :, b * PAGE:(b + 1) * PAGE].transpose(0, 1)
                                      for t in kv]) for kv in layers])
            .contiguous().view(-1).view(torch.uint8).numpy().copy() for b in ids]


@pytest.mark.parametrize("token_major", [True, False])
def test_copy_out_rows_lands_each_blocks_kv_in_kvbms_order(token_major: bool) -> None:
    layers = _layers(token_major)
    ids, at = [4, 0, 2], [7, 1, 8]
    rows = np.full((9, BPB), 5, dtype=np.uint8)
    CacheBlockSource(layers, LAYOUT).copy_out_rows(ids, rows, at)
    for r, want in zip(at, _by_torch(layers, ids)):
        assert np.array_equal(rows[r], want)
    out = [np.full(BPB, 7, dtype=np.uint8) for _ in ids]  # and copy_out's views the same
    CacheBlockSource(layers, LAYOUT).copy_out(ids, out)
    assert all(np.array_equal(rows[r], o) for r, o in zip(at, out))
    assert (rows[[i for i in range(9) if i not in at]] == 5).all()  # no other row written
    # The bytes are the tokens' K/V in kvbm's order: block 4, layer 1, V, token 2, head 1.
    blk = torch.from_numpy(rows[7].copy()).view(torch.float32).view(2, 2, PAGE, 2, 8)
    assert torch.equal(blk[1, 1, 2, 1], layers[1][1][0, 1, 4 * PAGE + 2])
    assert torch.equal(blk[0, 0, 3, 0], layers[0][0][0, 0, 4 * PAGE + 3])


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_copy_out_rows_of_any_blocks_into_any_rows_lands_their_kv(data: Any) -> None:
    n = data.draw(st.integers(1, 5))
    ids = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    at = data.draw(st.lists(st.integers(0, 8), min_size=n, max_size=n, unique=True))
    layers = _layers(True, seed=data.draw(st.integers(0, 3)))
    rows = np.zeros((9, BPB), dtype=np.uint8)
    CacheBlockSource(layers, LAYOUT).copy_out_rows(ids, rows, at)
    for r, want in zip(at, _by_torch(layers, ids)):
        assert np.array_equal(rows[r], want)


@pytest.mark.parametrize("token_major", [True, False])
def test_copy_out_rows_refuses_a_block_past_the_held_tokens(token_major: bool) -> None:
    # Token-major: the room goes on past the 5 blocks held, so a copy without the
    # check would read block 5 (stale room bytes) rather than fail.
    rows = np.zeros((9, BPB), dtype=np.uint8)
    with pytest.raises(LayoutError, match=r"block index 5 is out of range \[0, 5\)"):
        CacheBlockSource(_layers(token_major), LAYOUT).copy_out_rows([1, 5], rows, [0, 1])
    assert not rows.any()


def test_copy_out_rows_refuses_a_row_past_the_slots() -> None:
    rows = np.zeros((9, BPB), dtype=np.uint8)
    with pytest.raises(LayoutError, match=r"row 9 is out of range \[0, 9\)"):
        CacheBlockSource(_layers(True), LAYOUT).copy_out_rows([1, 2], rows, [0, 9])
    assert not rows.any()


def test_copy_out_rows_refuses_read_only_rows() -> None:
    rows = np.zeros((9, BPB), dtype=np.uint8)
    rows.flags.writeable = False
    with pytest.raises(LayoutError, match="writable"):
        CacheBlockSource(_layers(True), LAYOUT).copy_out_rows([1], rows, [0])


def test_a_prefix_stored_through_the_rows_reloads_the_plain_models_logprobs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbm.connectors.hf import KvbmCache, manager_for_model, prefill

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    calls: list[int] = []
    orig = CacheBlockSource.copy_out_rows

    def counted(self: Any, indices: Any, rows: Any, at: Any) -> None:
        calls.append(len(indices))
        orig(self, indices, rows, at)

    monkeypatch.setattr(CacheBlockSource, "copy_out_rows", counted)
    prompt = torch.randint(0, 256, (1, 6 * PAGE + 3), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        want = torch.log_softmax(model(prompt).logits[0, -1], -1)
        with manager_for_model(model, tiers=[{"type": "host", "num_blocks": 64}], page_size=PAGE,
                               name="tiny-llama-offload-rows") as mgr:
            first = KvbmCache(mgr, model)
            prefill(model, prompt, first, offload_wait=True)
            assert calls == [6]  # the store took the rows path, every block in one call
            stored = [(la.keys[:, :, :6 * PAGE].clone(), la.values[:, :, :6 * PAGE].clone())
                      for la in first.layers]
            cache = KvbmCache(mgr, model)
            out = prefill(model, prompt, cache, offload=False)
            assert cache.loaded_tokens == 6 * PAGE
            for li, la in enumerate(cache.layers):  # the loaded bytes are the stored ones
                assert torch.equal(la.keys[:, :, :6 * PAGE], stored[li][0]), f"layer {li} keys"
                assert torch.equal(la.values[:, :, :6 * PAGE], stored[li][1]), f"layer {li} values"
    got = torch.log_softmax(out.logits[0, -1], -1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
