"""A loaded prefix through the connector's short load path gives what the long way gives.

The load path's shortcuts: the tier's rows copied by row number (``copy_in_rows``, no
view per block), the layers' views of the room taken before the copy, the match's
pins handed to an I/O thread, the pool's rooms taken without their checks. Each test
fails where a shortcut answered differently: other bytes, a prefix longer than the
blocks loaded, pins never given back.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvbm import LayoutError  # noqa: E402
from kvbm.connectors.hf import KvbmCache, manager_for_model, prefill  # noqa: E402
from kvbm.layout import BlockLayout, ModelSpec  # noqa: E402
from kvbm.manager import OnboardResult  # noqa: E402
from kvbm_hf._blocks import CacheBlockDestination  # noqa: E402

PAGE = 4
VOCAB = 256


@pytest.fixture
def model() -> Any:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def manager(model: Any) -> Any:
    with manager_for_model(model, tiers=[{"type": "host", "num_blocks": 64}], page_size=PAGE,
                           name="tiny-llama-load-path") as mgr:
        yield mgr


def _prompt(n: int, seed: int) -> Any:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("capacity", [6 * PAGE, 6 * PAGE + 3])  # a room not a whole block long
def test_copy_in_rows_lands_the_bytes_copy_in_lands_from_views(capacity: int) -> None:
    layout = BlockLayout(ModelSpec(2, 2, 8, "float32"), PAGE)
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, (9, layout.bytes_per_block), dtype=np.uint8)
    ids, at = [4, 0, 2, 5], [7, 1, 8, 0]
    got = []
    for by_rows in (True, False):
        dest = CacheBlockDestination(layout, 6, capacity=capacity)
        dest.room.view(torch.uint8).zero_()
        if by_rows:
            dest.copy_in_rows(ids, rows, at)
        else:
            dest.copy_in(ids, [rows[i] for i in at])
        got.append(dest.room.view(torch.uint8).clone())  # bytes: random bits hold NaNs
    assert torch.equal(got[0], got[1])
    # Block 2 (row 8), layer 1, V, token 3: at its place in the token-major room.
    blk = torch.from_numpy(rows[8]).view(torch.float32).view(2, 2, PAGE, 2, 8)
    assert torch.equal(got[0].view(torch.float32).view(2, 2, 1, capacity, 2, 8)[1, 1, 0, 2 * PAGE + 3],
                       blk[1, 1, 3])


def test_copy_in_rows_leaves_the_callers_index_arrays_as_they_were() -> None:
    layout = BlockLayout(ModelSpec(2, 2, 8, "float32"), PAGE)
    rows = np.ones((6, layout.bytes_per_block), dtype=np.uint8)
    ids, at = np.array([2, 0], dtype=np.int64), np.array([5, 3], dtype=np.int64)
    dest = CacheBlockDestination(layout, 3, capacity=3 * PAGE)
    dest.copy_in_rows(ids, rows, at)  # int64 arrays: numpy hands them through uncopied
    assert ids.tolist() == [2, 0] and at.tolist() == [5, 3]
    room = dest.room.view(torch.uint8)
    assert bool(room[:, :, :, :PAGE].eq(1).all()) and bool(room[:, :, :, 2 * PAGE:].eq(1).all())


def test_copy_in_rows_refuses_a_row_out_of_range_and_rows_of_another_block_size() -> None:
    layout = BlockLayout(ModelSpec(2, 2, 8, "float32"), PAGE)
    dest = CacheBlockDestination(layout, 3, capacity=4 * PAGE)
    rows = np.zeros((4, layout.bytes_per_block), dtype=np.uint8)
    with pytest.raises(LayoutError, match=r"row 4 is out of range \[0, 4\) of rows"):
        dest.copy_in_rows([0, 1], rows, [1, 4])
    with pytest.raises(LayoutError, match=r"block index 3 is out of range \[0, 3\)"):
        dest.copy_in_rows([0, 3], rows, [1, 2])
    with pytest.raises(LayoutError, match=rf"C-contiguous uint8 array \[slots, {layout.bytes_per_block}\]"):
        dest.copy_in_rows([0], np.zeros((4, 64), dtype=np.uint8), [0])


def test_prefix_loaded_by_rows_gives_the_plain_models_logprobs(model: Any, manager: Any) -> None:
    import kvbm_hf._blocks as blocks

    calls: list[int] = []
    real = blocks.CacheBlockDestination.copy_in_rows

    def spy(self: Any, indices: Any, rows: Any, at: Any) -> None:
        calls.append(len(indices))
        real(self, indices, rows, at)

    prompt = _prompt(10 * PAGE + 3, 5)
    with torch.inference_mode():
        plain = model(prompt).logits.log_softmax(-1)
        prefill(model, prompt, KvbmCache(manager, model), offload_wait=True)
        blocks.CacheBlockDestination.copy_in_rows = spy  # type: ignore[method-assign]
        try:
            cache = KvbmCache(manager, model)
            out = prefill(model, prompt, cache, offload=False)
        finally:
            blocks.CacheBlockDestination.copy_in_rows = real  # type: ignore[method-assign]
    n = cache.loaded_tokens
    assert n == 10 * PAGE
    if not calls:
        pytest.skip("this executor copies a memory tier's blocks through views (no rows path)")
    assert calls == [10]
    torch.testing.assert_close(out.logits.log_softmax(-1), plain[:, n:], rtol=0, atol=1e-5)


def test_pins_of_a_load_are_given_back_once_the_manager_is_flushed(model: Any,
                                                                    manager: Any) -> None:
    prompt = _prompt(6 * PAGE + 1, 6)
    with torch.inference_mode():
        prefill(model, prompt, KvbmCache(manager, model), offload_wait=True)
        cache = KvbmCache(manager, model)
        assert cache.load_prefix(prompt) == 6 * PAGE
    assert manager.flush(10)
    st = manager.stats()
    assert st["pinned_blocks"] == 0 and st["leaked_pins"] == 0


def test_blocks_that_failed_to_load_are_not_part_of_the_layers_prefix(
        model: Any, manager: Any, monkeypatch: Any) -> None:
    prompt = _prompt(8 * PAGE + 1, 7)
    with torch.inference_mode():
        plain = model(prompt).logits.log_softmax(-1)
        prefill(model, prompt, KvbmCache(manager, model), offload_wait=True)
        real = manager.onboard

        def five_of_eight(match: Any, dest: Any, *a: Any, **k: Any) -> OnboardResult:
            res = real(match, dest, *a, **k)
            assert res.loaded == 8
            return OnboardResult(loaded=5, failed=[5])  # as if block 5 failed its read

        monkeypatch.setattr(manager, "onboard", five_of_eight)
        cache = KvbmCache(manager, model)
        assert cache.load_prefix(prompt) == 5 * PAGE
        # The layers were given 8 blocks before the copy; they hold 5 now.
        assert cache.get_seq_length() == 5 * PAGE
        assert all(layer.keys.shape[-2] == 5 * PAGE for layer in cache.layers)
        out = model(prompt[:, 5 * PAGE:], past_key_values=cache)
    torch.testing.assert_close(out.logits.log_softmax(-1), plain[:, 5 * PAGE:], rtol=0, atol=1e-5)


def test_load_that_raises_leaves_the_cache_empty_and_usable(model: Any, manager: Any,
                                                            monkeypatch: Any) -> None:
    prompt = _prompt(6 * PAGE + 1, 8)
    with torch.inference_mode():
        plain = model(prompt).logits.log_softmax(-1)
        prefill(model, prompt, KvbmCache(manager, model), offload_wait=True)

        def broken(match: Any, dest: Any, *a: Any, **k: Any) -> OnboardResult:
            raise OSError("tier gone")

        monkeypatch.setattr(manager, "onboard", broken)
        cache = KvbmCache(manager, model)
        with pytest.raises(OSError, match="tier gone"):
            cache.load_prefix(prompt)
        assert cache.get_seq_length() == 0  # not the 6 blocks the layers were given first
        out = model(prompt, past_key_values=cache)  # the whole prompt, computed
    torch.testing.assert_close(out.logits.log_softmax(-1), plain, rtol=0, atol=1e-5)
    assert manager.flush(10) and manager.stats()["pinned_blocks"] == 0


@pytest.mark.parametrize("stored", [False, True])  # the room reserved / holding a prefix
def test_room_of_a_live_cache_is_not_handed_to_the_next_request(model: Any, manager: Any,
                                                               stored: bool) -> None:
    prompt = _prompt(6 * PAGE + 1, 12)
    with torch.inference_mode():
        if stored:
            prefill(model, prompt, KvbmCache(manager, model), offload_wait=True)
        a = KvbmCache(manager, model)
        assert a.load_prefix(prompt) == (6 * PAGE if stored else 0)
        # a's layers hold the pool's room views (shared); a's own hold keeps the room.
        b = KvbmCache(manager, model)
        b.load_prefix(prompt)
        ra, rb = a.layers[0]._room, b.layers[0]._room
        assert ra is not None and rb is not None
        assert ra[0].data_ptr() != rb[0].data_ptr()
        del a, b, ra, rb
        c = KvbmCache(manager, model)  # both gone: a room comes back from the pool
        c.load_prefix(prompt)
    from kvbm_hf._rooms import state_of

    assert state_of(manager).allocated == 2  # a's and b's; c took one of them


def test_offload_of_the_loaded_tensor_changed_in_place_is_checked_again(model: Any,
                                                                        manager: Any) -> None:
    from kvbm import TokenError

    prompt = _prompt(3 * PAGE + 1, 13)
    with torch.inference_mode():
        cache = KvbmCache(manager, model)
        out = prefill(model, prompt, cache, offload=False)  # load_prefix read and checked it
        assert out.logits.shape[1] == prompt.shape[1]
        prompt[0, 2] = VOCAB + 7  # changed in place: its version moved on
        with pytest.raises(TokenError, match=r"\[0, 256\).*max 263"):
            cache.offload_blocks(prompt, wait=False)


@pytest.mark.parametrize("stored", [False, True])  # the room reserved / holding a prefix
def test_layer_kept_after_its_cache_keeps_the_room_from_the_next_request(model: Any,
                                                                         manager: Any,
                                                                         stored: bool) -> None:
    # A layer's views of the room are the pool's (shared) or not made yet (the held
    # tokens are viewed when first read): what keeps the room busy is the hold each
    # layer keeps (``KvbmLayer._keep``), so a layer outliving its cache still reads
    # its own bytes.
    prompt, other = _prompt(6 * PAGE + 1, 21), _prompt(6 * PAGE + 1, 22)
    with torch.inference_mode():
        if stored:
            first = KvbmCache(manager, model)
            prefill(model, prompt, first, offload_wait=True)
            want = first.layers[0].keys[:, :, : 6 * PAGE].clone()
            del first
        a = KvbmCache(manager, model)
        assert a.load_prefix(prompt) == (6 * PAGE if stored else 0)
        layer = a.layers[0]
        del a
        b = KvbmCache(manager, model)
        prefill(model, other, b, offload=False)  # computed into b's room
        room = layer._room
        assert room is not None and room[0].data_ptr() != b.layers[0]._room[0].data_ptr()
        if stored:
            assert torch.equal(layer.keys, want)


def test_held_tokens_are_the_rooms_first_tokens_when_read(model: Any, manager: Any) -> None:
    prompt = _prompt(5 * PAGE + 1, 23)
    with torch.inference_mode():
        prefill(model, prompt, KvbmCache(manager, model), offload_wait=True)
        cache = KvbmCache(manager, model)
        n = cache.load_prefix(prompt)
        assert n == 5 * PAGE and cache.get_seq_length() == n  # counted before any view
        for layer in cache.layers:
            room = layer._room
            assert room is not None
            k, v = layer.keys, layer.values
            assert k.shape[-2] == v.shape[-2] == n
            assert k.data_ptr() == room[0].data_ptr() and v.data_ptr() == room[1].data_ptr()
            assert torch.equal(k, room[0][:, :, :n]) and torch.equal(v, room[1][:, :, :n])


def test_inference_tensor_ids_are_read_again_at_offload(model: Any, manager: Any) -> None:
    # An inference tensor counts no versions (reading ``_version`` raises): its row is
    # not kept, so ids changed in place after the load are checked again.
    from kvbm import TokenError

    with torch.inference_mode():
        prompt = _prompt(3 * PAGE + 1, 24)
        cache = KvbmCache(manager, model)
        prefill(model, prompt, cache, offload=False)
        assert cache._checked is None
        prompt[0, 1] = VOCAB + 9
        with pytest.raises(TokenError, match=r"\[0, 256\).*max 265"):
            cache.offload_blocks(prompt)


@pytest.mark.parametrize("dtype", ["int64", "int32"])  # the row a view / a converted copy
def test_inference_tensor_changed_in_place_offloads_the_blocks_of_its_new_ids(
        model: Any, manager: Any, dtype: str) -> None:
    prompt = _prompt(4 * PAGE + 1, 26).to(getattr(torch, dtype))
    with torch.inference_mode():
        prompt = prompt.clone()  # an inference tensor
        cache = KvbmCache(manager, model)
        prefill(model, prompt, cache, offload=False)
        prompt[0, 1] = (int(prompt[0, 1]) + 1) % VOCAB  # in the vocabulary, changed
        cache.offload_blocks(prompt)  # what the tensor holds now, as a re-read gives
    ids = prompt[0, : 4 * PAGE].tolist()
    m = manager.match_prefix(ids)
    try:
        assert m.num_blocks == 4
    finally:
        m.release()


def test_blocks_stored_through_the_cache_match_the_managers_hash_of_a_list(model: Any,
                                                                        manager: Any) -> None:
    # The connector hashes its checked ids as u32 itself; the manager's hash of the
    # same ids given as a Python list must name the same blocks.
    prompt = _prompt(4 * PAGE + 1, 25)
    with torch.inference_mode():
        prefill(model, prompt, KvbmCache(manager, model), offload_wait=True)
    m = manager.match_prefix(prompt[0].tolist())
    try:
        assert m.num_blocks == 4
    finally:
        m.release()


def _pooled(layout: BlockLayout, blocks: int, capacity: int) -> CacheBlockDestination:
    from kvbm_hf._blocks import room_views

    m = layout.model
    room = torch.zeros((m.num_layers, 2, 1, capacity, m.num_kv_heads, m.head_dim))
    return CacheBlockDestination.pooled(layout, blocks, room, room_views(room))


@pytest.mark.parametrize("capacity", [6 * PAGE, 6 * PAGE + 3])
def test_compiled_table_lands_the_bytes_the_numpy_tables_land(capacity: int) -> None:
    import kvbm_hf._table as table

    if table.load() is None:
        pytest.skip("no C compiler: the numpy tables only")
    layout = BlockLayout(ModelSpec(2, 2, 8, "float32"), PAGE)
    rows = np.random.default_rng(5).integers(0, 256, (9, layout.bytes_per_block), dtype=np.uint8)
    ids, at = [4, 0, 2, 5], [7, 1, 8, 0]
    got, used = [], []
    real = CacheBlockDestination._table_in
    for compiled in (True, False):
        table.enabled = compiled
        try:
            dest = _pooled(layout, 6, capacity)
            used.append(real(dest, dest._views, ids, rows, at) if compiled else False)
            if not compiled:
                dest.copy_in_rows(ids, rows, at)
        finally:
            table.enabled = True
        got.append(dest.room.view(torch.uint8).clone())  # bytes: random bits hold NaNs
    assert used == [True, False]
    assert torch.equal(got[0], got[1])
    # Block 5 (row 0), layer 0, K, token 2: at its place in the token-major room.
    blk = torch.from_numpy(rows[0]).view(torch.float32).view(2, 2, PAGE, 2, 8)
    assert torch.equal(got[0].view(torch.float32).view(2, 2, 1, capacity, 2, 8)[0, 0, 0, 5 * PAGE + 2],
                       blk[0, 0, 2])


@pytest.mark.parametrize(("ids", "at", "error"), [
    ([0, 1], [1, 4], r"row 4 is out of range \[0, 4\) of rows"),
    ([0, 3], [1, 2], r"block index 3 is out of range \[0, 3\)"),
    ([0, -1], [1, 2], r"block index -1 is out of range \[0, 3\)"),
    ([0, 1], [-1, 2], r"row -1 is out of range \[0, 4\) of rows"),
    ([0, 2**70], [1, 2], r"Python int too large|out of range"),
])
def test_compiled_table_leaves_a_bad_number_to_the_numpy_checks(ids: list[int], at: list[int],
                                                               error: str) -> None:
    layout = BlockLayout(ModelSpec(2, 2, 8, "float32"), PAGE)
    dest = _pooled(layout, 3, 4 * PAGE)
    rows = np.ones((4, layout.bytes_per_block), dtype=np.uint8)
    assert not dest._table_in(dest._views, ids, rows, at)  # type: ignore[arg-type]
    with pytest.raises((LayoutError, OverflowError), match=error):
        dest.copy_in_rows(ids, rows, at)
    assert not bool(dest.room.view(torch.uint8).any())  # nothing copied before the error


def test_prefix_loaded_through_the_compiled_table_gives_the_plain_models_logprobs(
        model: Any, manager: Any) -> None:
    import kvbm_hf._table as table

    if table.load() is None:
        pytest.skip("no C compiler: the numpy tables only")
    used: list[bool] = []
    real = CacheBlockDestination._table_in

    def spy(self: Any, *args: Any) -> bool:
        used.append(real(self, *args))
        return used[-1]

    prompt = _prompt(12 * PAGE + 1, 9)
    with torch.inference_mode():
        plain = model(prompt).logits.log_softmax(-1)
        prefill(model, prompt, KvbmCache(manager, model), offload_wait=True)
        CacheBlockDestination._table_in = spy  # type: ignore[method-assign]
        try:
            cache = KvbmCache(manager, model)
            out = prefill(model, prompt, cache, offload=False)
        finally:
            CacheBlockDestination._table_in = real  # type: ignore[method-assign]
    assert cache.loaded_tokens == 12 * PAGE
    if not used:
        pytest.skip("this executor copies a memory tier's blocks through views (no rows path)")
    assert used == [True]
    torch.testing.assert_close(out.logits.log_softmax(-1), plain[:, 12 * PAGE:], rtol=0, atol=1e-5)
