"""The transformers connector's rooms and background offloads, run with a real (tiny,
random) Llama model: a room is reused only once nothing reads it, lies on huge pages
where the kernel gives them, and a request waits for an offload of its own prefix.

Split from ``test_hf_connector.py`` (its 650-line limit); the same model and fixtures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvbm.connectors.hf import KvbmCache, manager_for_model, prefill  # noqa: E402

PAGE = 4
VOCAB = 256
TOL = 1e-4


def tiny_llama_config(**kw: Any) -> LlamaConfig:
    base: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=512)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def model() -> Any:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def host_manager(model: Any) -> Any:
    with manager_for_model(model, tiers=[{"type": "host", "num_blocks": 128}], page_size=PAGE,
                           name="tiny-llama-seed0") as mgr:
        yield mgr


def tokens(n: int, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g)


def test_room_is_not_handed_out_while_its_offload_reads_it(model: Any, host_manager: Any,
                                                           monkeypatch: Any) -> None:
    import threading

    prefix = tokens(6 * PAGE, 33)
    qa, qb = tokens(3 * PAGE + 1, 34), tokens(3 * PAGE + 1, 35)
    gate = threading.Event()
    real = host_manager.offload

    def held_offload(*args: Any, **kwargs: Any) -> Any:
        gate.wait(10)  # the store starts only after the next request computed
        return real(*args, **kwargs)

    with torch.inference_mode():
        prefill(model, prefix, KvbmCache(host_manager, model), offload_wait=True)
        a = KvbmCache(host_manager, model)
        prompt_a = torch.cat([prefix, qa], dim=1)
        prefill(model, prompt_a, a, offload=False)
        kv_a = [layer.keys.clone() for layer in a.layers]
        room_a = a.layers[0].keys.data_ptr()
        monkeypatch.setattr(host_manager, "offload", held_offload)
        fut = a.offload_blocks(prompt_a, wait=False)
        del a  # the request is over; only its offload still reads the room
        b = KvbmCache(host_manager, model)
        prefill(model, torch.cat([prefix, qb], dim=1), b, offload=False)
        assert b.layers[0].keys.data_ptr() != room_a
        gate.set()
        assert fut.result(timeout=30).stored == 3
        monkeypatch.setattr(host_manager, "offload", real)
        c = KvbmCache(host_manager, model)
        assert c.load_prefix(torch.cat([prompt_a, tokens(1, 36)], dim=1)) == 9 * PAGE
    for li, layer in enumerate(c.layers):
        assert torch.equal(layer.keys[:, :, :9 * PAGE], kv_a[li][:, :, :9 * PAGE]), f"layer {li}"


def test_room_of_a_finished_request_is_reused(model: Any, host_manager: Any) -> None:
    from kvbm_hf._rooms import state_of

    prompt = tokens(5 * PAGE + 1, 37)
    with torch.inference_mode():
        prefill(model, prompt, KvbmCache(host_manager, model), offload_wait=True)
        a = KvbmCache(host_manager, model)
        prefill(model, prompt, a, offload_wait=True)
        ptr = a.layers[0].keys.data_ptr()
        made = state_of(host_manager).allocated
        del a
        b = KvbmCache(host_manager, model)
        assert b.load_prefix(prompt) == 5 * PAGE
    assert b.layers[0].keys.data_ptr() == ptr
    assert state_of(host_manager).allocated == made


@pytest.mark.parametrize("token_major", [False, True])
def test_native_and_torch_block_copies_move_the_same_bytes(token_major: bool) -> None:
    import numpy as np

    from kvbm.engine_blocks import _native
    from kvbm.layout import BlockLayout, ModelSpec
    from kvbm_hf._blocks import CacheBlockDestination, CacheBlockSource

    layout = BlockLayout(ModelSpec(2, 2, 8, "float32"), PAGE)
    g = torch.Generator().manual_seed(40)

    def kv() -> Any:
        if token_major:  # kvbm's room: [1, seq, heads, hd] memory seen as [1, heads, seq, hd]
            return torch.randn(1, 5 * PAGE, 2, 8, generator=g).transpose(1, 2)
        return torch.randn(1, 2, 5 * PAGE, 8, generator=g)

    layers = [(kv(), kv()) for _ in range(2)]
    ids = [4, 0, 2]
    got = {}
    for native in (True, False):
        _native.enabled = native
        try:
            out = [np.full(layout.bytes_per_block, 7, dtype=np.uint8) for _ in ids]
            CacheBlockSource(layers, layout).copy_out(ids, out)
            dest = CacheBlockDestination(layout, 5, capacity=6 * PAGE)
            dest.room.zero_()
            dest.copy_in(ids, out)
            got[native] = ([o.copy() for o in out], dest.room.clone())
        finally:
            _native.enabled = True
    assert all(np.array_equal(a, b) for a, b in zip(got[True][0], got[False][0]))
    assert torch.equal(got[True][1], got[False][1])
    # And the bytes are the tokens' K/V, token-major: block 4, layer 1, V, token 0, head 1.
    k, v = layers[1]
    blk = torch.from_numpy(got[True][0][0]).view(torch.float32).view(2, 2, PAGE, 2, 8)
    assert torch.equal(blk[1, 1, 0, 1], v[0, 1, 4 * PAGE])


def test_room_is_reused_as_soon_as_its_background_offload_is_done(model: Any,
                                                                  host_manager: Any) -> None:
    import threading

    from kvbm_hf._rooms import state_of

    prompt = tokens(5 * PAGE + 1, 41)
    with torch.inference_mode():
        prefill(model, prompt, KvbmCache(host_manager, model), offload_wait=True)
        a = KvbmCache(host_manager, model)
        prefill(model, torch.cat([prompt, tokens(2 * PAGE, 42)], dim=1), a, offload=False)
        ptr = a.layers[0].keys.data_ptr()
        made = state_of(host_manager).allocated
        # The I/O thread is held inside the done future's callbacks: its work item (what
        # it ran) is still alive, as it is in the instant after any offload finishes.
        checked, in_callback = threading.Event(), threading.Event()
        gate = threading.Event()
        real = host_manager.offload

        def gated(*args: Any, **kwargs: Any) -> Any:
            gate.wait(10)
            return real(*args, **kwargs)

        def hold(_: Any) -> None:
            in_callback.set()
            checked.wait(10)

        host_manager.offload = gated
        try:
            fut = a.offload_blocks(torch.cat([prompt, tokens(2 * PAGE, 42)], dim=1), wait=False)
            fut.add_done_callback(hold)
            gate.set()
            assert fut.result(timeout=30).stored == 2
            assert in_callback.wait(10)
            del a  # the request is over and its offload done
            b = KvbmCache(host_manager, model)
            loaded = b.load_prefix(prompt)
            reused = b.layers[0].keys.data_ptr() == ptr
            allocated = state_of(host_manager).allocated - made
        finally:
            checked.set()
            host_manager.offload = real
    assert loaded == 5 * PAGE
    assert allocated == 0 and reused


def test_request_that_computes_a_prefix_leaves_its_room_to_the_one_that_loads_it(
        model: Any, host_manager: Any) -> None:
    from kvbm_hf._rooms import state_of

    prompt = tokens(7 * PAGE + 1, 43)
    with torch.inference_mode():
        a = KvbmCache(host_manager, model)
        plain = model(prompt).logits[:, -1]
        # Nothing cached: computed. (The output would hold the cache: only logits kept.)
        logits = prefill(model, prompt, a, offload_wait=True).logits[:, -1]
        assert a.loaded_tokens == 0
        ptr = a.layers[0].keys.data_ptr()
        made = state_of(host_manager).allocated
        del a
        b = KvbmCache(host_manager, model)
        assert b.load_prefix(prompt) == 7 * PAGE
    assert b.layers[0].keys.data_ptr() == ptr
    assert state_of(host_manager).allocated == made
    # Computed into the room, the prompt's logits are the plain model's.
    assert float((logits - plain).abs().max()) <= TOL


def test_background_offload_that_fails_raises_from_its_future(model: Any, host_manager: Any,
                                                               monkeypatch: Any) -> None:
    import time

    prompt = tokens(4 * PAGE + 1, 44)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("tier gone")

    with torch.inference_mode():
        a = KvbmCache(host_manager, model)
        prefill(model, prompt, a, offload=False)
        monkeypatch.setattr(host_manager, "offload", broken)
        fut = a.offload_blocks(prompt, wait=False)
        with pytest.raises(OSError, match="tier gone"):
            fut.result(timeout=30)
        monkeypatch.undo()
        # Nothing is left listed as being stored: the next request does not wait for it.
        t0 = time.monotonic()
        assert KvbmCache(host_manager, model).load_prefix(prompt) == 0
    assert time.monotonic() - t0 < 30


# -- huge-page rooms, the few-op layer views, hashing in the background -----------------
def _vm_flags(addr: int) -> set[str] | None:
    """The ``VmFlags`` of the mapping holding ``addr`` (None without /proc/self/smaps)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    inside = False
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    return None


def test_room_lies_on_2mib_aligned_memory_advised_for_huge_pages(model: Any,
                                                                 host_manager: Any) -> None:
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE on this platform")
    with torch.inference_mode():
        cache = KvbmCache(host_manager, model)
        prefill(model, tokens(5 * PAGE + 1, 50), cache, offload=False)
        ptr = cache.layers[0].keys.data_ptr()
    assert ptr % (2 * 2**20) == 0
    flags = _vm_flags(ptr)
    if flags is None:
        pytest.skip("no /proc/self/smaps")
    assert "hg" in flags  # MADV_HUGEPAGE given: the kernel backs it with 2 MiB pages


def test_prefix_loaded_into_a_huge_page_room_is_every_layers_computed_kv(model: Any,
                                                                        host_manager: Any) -> None:
    from transformers import DynamicCache

    prompt = tokens(9 * PAGE + 3, 51)
    with torch.inference_mode():
        prefill(model, prompt, KvbmCache(host_manager, model), offload_wait=True)
        plain = DynamicCache()
        model(prompt, past_key_values=plain)
        cache = KvbmCache(host_manager, model)
        n = cache.load_prefix(prompt)
    assert n == 9 * PAGE
    assert cache.layers[0].keys.data_ptr() % (2 * 2**20) == 0
    for li, (ours, theirs) in enumerate(zip(cache.layers, plain.layers, strict=True)):
        # Bytes, not closeness: both are the same model's K/V of the same tokens.
        assert torch.equal(ours.keys, theirs.keys[:, :, :n]), f"layer {li} keys"
        assert torch.equal(ours.values, theirs.values[:, :, :n]), f"layer {li} values"


def test_room_falls_back_to_torch_memory_with_the_same_bytes(model: Any, host_manager: Any,
                                                             monkeypatch: Any) -> None:
    from kvbm_hf import _rooms

    prompt = tokens(6 * PAGE + 1, 52)
    got = []
    with torch.inference_mode():
        prefill(model, prompt, KvbmCache(host_manager, model), offload_wait=True)
        for huge in (True, False):
            monkeypatch.setattr(_rooms, "huge_rooms", huge)
            host_manager_state = _rooms.state_of(host_manager)
            host_manager_state._rooms.clear()  # the next request makes its room anew
            cache = KvbmCache(host_manager, model)
            assert cache.load_prefix(prompt) == 6 * PAGE
            got.append([(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
            aligned = cache.layers[0].keys.data_ptr() % (2 * 2**20) == 0
            assert aligned == huge
            del cache
    for li, ((ka, va), (kb, vb)) in enumerate(zip(*got, strict=True)):
        assert torch.equal(ka, kb) and torch.equal(va, vb), f"layer {li}"


def _gate_submits(manager: Any, monkeypatch: Any) -> Any:
    """Hold every background job the manager's executor is given until the gate opens."""
    import threading

    gate = threading.Event()
    real = manager.executor.submit

    def gated(fn: Any, *args: Any, **kwargs: Any) -> Any:
        def later() -> Any:
            gate.wait(20)
            return fn(*args, **kwargs)
        return real(later)

    monkeypatch.setattr(manager.executor, "submit", gated)
    return gate


def test_request_sharing_a_prefix_with_an_offload_not_yet_hashed_waits_and_loads_it(
        model: Any, host_manager: Any, monkeypatch: Any) -> None:
    import threading

    prefix = tokens(8 * PAGE, 53)
    first = torch.cat([prefix, tokens(3, 54)], dim=1)
    with torch.inference_mode():
        a = KvbmCache(host_manager, model)
        prefill(model, first, a, offload=False)
        kv_a = [(layer.keys[:, :, :8 * PAGE].clone(), layer.values[:, :, :8 * PAGE].clone())
                for layer in a.layers]
        gate = _gate_submits(host_manager, monkeypatch)
        fut = a.offload_blocks(first, wait=False)  # not hashed yet: held before it starts
        opener = threading.Timer(0.3, gate.set)
        opener.start()
        b = KvbmCache(host_manager, model)
        n = b.load_prefix(torch.cat([prefix, tokens(5, 55)], dim=1))
        opener.join()
        assert fut.result(timeout=30).stored == 8
    assert n == 8 * PAGE  # waited for the listing, then for the store
    for li, layer in enumerate(b.layers):
        assert torch.equal(layer.keys, kv_a[li][0]), f"layer {li} keys"
        assert torch.equal(layer.values, kv_a[li][1]), f"layer {li} values"


def test_request_sharing_nothing_does_not_wait_for_an_offload_not_yet_hashed(
        model: Any, host_manager: Any, monkeypatch: Any) -> None:
    import time

    first = tokens(6 * PAGE + 1, 56)
    with torch.inference_mode():
        a = KvbmCache(host_manager, model)
        prefill(model, first, a, offload=False)
        gate = _gate_submits(host_manager, monkeypatch)
        fut = a.offload_blocks(first, wait=False)
        try:
            t0 = time.monotonic()
            n = KvbmCache(host_manager, model).load_prefix(tokens(6 * PAGE + 1, 57))
            waited = time.monotonic() - t0
        finally:
            gate.set()
        assert fut.result(timeout=30).stored == 6
    assert n == 0
    assert waited < 10  # the gate holds the offload for 20 s: it did not wait for it


def test_background_offload_stores_the_tokens_as_they_were_handed_over(
        model: Any, host_manager: Any, monkeypatch: Any) -> None:
    prompt = tokens(5 * PAGE + 1, 58)
    original = prompt.clone()
    with torch.inference_mode():
        a = KvbmCache(host_manager, model)
        prefill(model, prompt, a, offload=False)
        gate = _gate_submits(host_manager, monkeypatch)
        fut = a.offload_blocks(prompt, wait=False)
        prompt[0, 2] = (prompt[0, 2] + 1) % VOCAB  # the caller reuses its tensor at once
        gate.set()
        assert fut.result(timeout=30).stored == 5
        # Stored under the tokens whose KV it is: the original prompt loads them, the
        # changed one (whose KV differs from block 0 on) finds nothing.
        assert KvbmCache(host_manager, model).load_prefix(prompt) == 0
        assert KvbmCache(host_manager, model).load_prefix(original) == 5 * PAGE


def test_copy_in_shared_between_copy_threads_lands_every_block_where_the_torch_path_does() -> None:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from kvbm.engine_blocks import _native
    from kvbm.layout import BlockLayout, ModelSpec
    from kvbm_hf._blocks import CacheBlockDestination

    if not hasattr(_native, "share") or _native.copy_runs() is None:
        pytest.skip("no native shared copy here")
    layout = BlockLayout(ModelSpec(2, 8, 64, "float32"), 16)  # 128 KiB blocks
    n = 64  # 8 MiB: several chunks, so a helper thread takes some
    rng = np.random.default_rng(59)
    src = [rng.integers(0, 256, layout.bytes_per_block, dtype=np.uint8) for _ in range(n)]
    ids = list(rng.permutation(n))
    got = []
    for shared in (True, False):
        dest = CacheBlockDestination(layout, n, capacity=n * 16 + 16)
        dest.room.zero_()
        if shared:
            with ThreadPoolExecutor(1) as pool, _native.share(pool, 2):
                dest.copy_in(ids, src)
        else:
            _native.enabled = False
            try:
                dest.copy_in(ids, src)
            finally:
                _native.enabled = True
        got.append(dest.room.view(torch.uint8).clone())  # bytes: random bits hold NaNs
    assert torch.equal(got[0], got[1])
    assert bool(got[0].ne(0).any())  # blocks were written at all
