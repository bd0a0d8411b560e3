"""A prefix loaded layer by layer while the model computes (``kvbm_hf._fill``).

``load_prefix`` copies the first layer and leaves the others to an I/O thread; the
model reads each layer only once its copy landed. Each test slows (or breaks) the
background copy, so the model reaches a layer before its bytes would be there: the
rooms are poisoned with NaN first, so a read that did not wait shows in the logprobs.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvbm_hf._fill as fill_mod  # noqa: E402
from kvbm.connectors.hf import KvbmCache, manager_for_model, prefill  # noqa: E402
from kvbm.engine_blocks import _native  # noqa: E402
from kvbm_hf._rooms import state_of  # noqa: E402

PAGE = 4
VOCAB = 256
LAYERS = 3

if _native.copy_runs() is None:  # pragma: no cover - a machine without a C compiler
    pytest.skip("no native copy loop: the load copies views, whole", allow_module_level=True)


@pytest.fixture(autouse=True)
def layered(monkeypatch: Any) -> None:
    """Layer by layer whatever the CPUs (kvbm's default: only beside a spare CPU)."""
    monkeypatch.setattr(KvbmCache, "layered", True)


@pytest.fixture
def model() -> Any:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def manager(model: Any) -> Any:
    with manager_for_model(model, tiers=[{"type": "host", "num_blocks": 64}], page_size=PAGE,
                           name="tiny-llama-layerwise") as mgr:
        yield mgr


class _SlowCopies:
    """``_native`` as the fill sees it, with copy number ``slow`` (1-based) delayed by
    ``delay`` seconds (or until ``gate`` is set, 10 s at most), or every copy raising
    with ``broken``."""

    def __init__(self, slow: int = 1, delay: float = 0.4, broken: bool = False,
                 gate: threading.Event | None = None) -> None:
        self.slow, self.delay, self.broken, self.calls = slow, delay, broken, 0
        self.gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(_native, name)

    def run_copy(self, fn: Any, n: int, dst: Any, src: Any, run: int) -> None:
        self.calls += 1
        if self.broken:
            raise OSError("copy engine gone")
        if self.calls == self.slow:
            if self.gate is not None:
                self.gate.wait(10)
            else:
                time.sleep(self.delay)
        _native.run_copy(fn, n, dst, src, run)


def _prompt(n: int, seed: int) -> Any:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _store_and_poison(model: Any, manager: Any, prompt: Any) -> None:
    """Store ``prompt``'s blocks, then fill every pooled room with NaN: the room the
    prefix was computed into holds its KV otherwise, and a read that did not wait
    would find the right bytes there anyway."""
    with torch.inference_mode():
        prefill(model, prompt, KvbmCache(manager, model), offload_wait=True)
    assert manager.flush(10)
    with torch.no_grad():
        for r in state_of(manager)._rooms:
            r.tensor.fill_(float("nan"))


def test_layers_after_the_first_are_still_being_copied_when_load_prefix_returns(
        model: Any, manager: Any, monkeypatch: Any) -> None:
    prompt = _prompt(8 * PAGE + 1, 1)
    _store_and_poison(model, manager, prompt)
    monkeypatch.setattr(fill_mod, "_native", _SlowCopies(slow=1, delay=0.3))
    with torch.inference_mode():
        cache = KvbmCache(manager, model)
        assert cache.load_prefix(prompt) == 8 * PAGE
        fill = cache.fill
        assert fill is not None and fill.first == 1 and not fill.done
        assert cache.get_seq_length() == 8 * PAGE  # a count: no wait for the copy
        assert not fill.done
        assert not bool(cache.layers[0].keys.isnan().any())  # copied before the return
        cache.wait_loaded()
        assert fill.done and fill.landed == LAYERS
        assert not any(bool(layer.keys.isnan().any()) or bool(layer.values.isnan().any())
                       for layer in cache.layers)


@pytest.mark.parametrize("slow", [1, 2])  # layer 1 or layer 2 lands late
def test_model_waits_for_a_layer_still_copying_and_gives_the_recompute_logprobs(
        model: Any, manager: Any, monkeypatch: Any, slow: int) -> None:
    prompt = _prompt(10 * PAGE + 3, 2)
    with torch.inference_mode():
        plain = model(prompt).logits.log_softmax(-1)
    _store_and_poison(model, manager, prompt)
    n = 10 * PAGE

    def run() -> Any:
        with torch.inference_mode():
            cache = KvbmCache(manager, model)
            assert cache.load_prefix(prompt) == n
            out = model(prompt[:, n:], past_key_values=cache).logits.log_softmax(-1)
        assert manager.flush(10)
        return out, cache.fill

    # Layer ``slow``'s copy (copy number ``slow``: layer 0 is not the fill's) starts only
    # once the model asks for that layer, however fast or slow this machine is.
    real_wait = fill_mod.LayerFill.wait

    # Negative control: without the wait the model reads the poisoned room.
    gate = threading.Event()
    monkeypatch.setattr(fill_mod, "_native", _SlowCopies(slow=slow, gate=gate))
    with monkeypatch.context() as m:
        m.setattr(fill_mod.LayerFill, "wait", lambda self, layer: None)
        with torch.inference_mode():
            cache = KvbmCache(manager, model)
            assert cache.load_prefix(prompt) == n
            bad = model(prompt[:, n:], past_key_values=cache).logits.log_softmax(-1)
        gate.set()
        assert manager.flush(10)
    assert not torch.allclose(bad, plain[:, n:], atol=1e-3)
    with torch.no_grad():
        for r in state_of(manager)._rooms:
            r.tensor.fill_(float("nan"))

    gate = threading.Event()
    asked: list[int] = []

    def wait(self: Any, layer: int) -> None:
        if layer == slow and not self.done:
            asked.append(layer)
            gate.set()  # the model reached the layer before its copy began
        real_wait(self, layer)

    monkeypatch.setattr(fill_mod, "_native", _SlowCopies(slow=slow, gate=gate))
    monkeypatch.setattr(fill_mod.LayerFill, "wait", wait)
    out, fill = run()
    assert asked == [slow] and fill is not None and fill.waited > 0
    torch.testing.assert_close(out, plain[:, n:], rtol=0, atol=1e-5)


def test_layer_by_layer_load_lands_the_bytes_a_whole_load_lands(model: Any, manager: Any) -> None:
    prompt = _prompt(9 * PAGE + 2, 3)
    _store_and_poison(model, manager, prompt)
    got = []
    with torch.inference_mode():
        for layered in (False, True):
            cache = KvbmCache(manager, model)
            cache.layered = layered
            assert cache.load_prefix(prompt) == 9 * PAGE
            assert (cache.fill is not None) == layered
            cache.wait_loaded()
            got.append([(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
            del cache
            assert manager.flush(10)
    for (k0, v0), (k1, v1) in zip(*got, strict=True):
        assert torch.equal(k0.view(torch.int32), k1.view(torch.int32))
        assert torch.equal(v0.view(torch.int32), v1.view(torch.int32))
        assert not bool(k1.isnan().any())


def test_pins_are_held_until_the_last_layer_is_copied(model: Any, manager: Any,
                                                      monkeypatch: Any) -> None:
    prompt = _prompt(6 * PAGE + 1, 4)
    _store_and_poison(model, manager, prompt)
    monkeypatch.setattr(fill_mod, "_native", _SlowCopies(slow=LAYERS - 1, delay=0.3))
    with torch.inference_mode():
        cache = KvbmCache(manager, model)
        assert cache.load_prefix(prompt) == 6 * PAGE
        assert manager.stats()["pinned_blocks"] == 6  # the last layer is still being read
        cache.wait_loaded()
        assert manager.stats()["pinned_blocks"] == 0  # given back before it was marked done
    assert manager.stats()["leaked_pins"] == 0


def test_room_of_a_dropped_cache_is_not_handed_out_while_its_layers_are_copied(
        model: Any, manager: Any, monkeypatch: Any) -> None:
    prompt = _prompt(6 * PAGE + 1, 5)
    _store_and_poison(model, manager, prompt)
    st = state_of(manager)
    made = st.allocated
    monkeypatch.setattr(fill_mod, "_native", _SlowCopies(slow=1, delay=0.4))
    with torch.inference_mode():
        a = KvbmCache(manager, model)
        assert a.load_prefix(prompt) == 6 * PAGE
        fill = a.fill
        room_a = a.layers[0]._room[0].data_ptr()
        del a  # the request is gone; its layers' copy is not
        b = KvbmCache(manager, model)
        b.load_prefix(_prompt(6 * PAGE + 1, 99))  # nothing stored: computed into a room
        assert b.layers[0]._room[0].data_ptr() != room_a
        assert fill is not None and not fill.done
        del b
    assert manager.flush(10) and fill.done
    assert st.allocated == made + 1  # b's; a's room was free again only after its copy


def test_a_failed_layer_copy_fails_the_forward_instead_of_reading_the_room(
        model: Any, manager: Any, monkeypatch: Any) -> None:
    prompt = _prompt(6 * PAGE + 1, 6)
    _store_and_poison(model, manager, prompt)
    monkeypatch.setattr(fill_mod, "_native", _SlowCopies(broken=True))
    with torch.inference_mode():
        cache = KvbmCache(manager, model)
        assert cache.load_prefix(prompt) == 6 * PAGE
        with pytest.raises(RuntimeError, match="copying layer 1 of the loaded prefix failed"):
            model(prompt[:, 6 * PAGE:], past_key_values=cache)
    assert manager.flush(10)
    assert manager.stats()["pinned_blocks"] == 0


@pytest.mark.parametrize("threads", ["all", "one"])
def test_load_goes_layer_by_layer_by_default_only_beside_a_cpu_torch_leaves(
        model: Any, manager: Any, monkeypatch: Any, threads: str) -> None:
    import kvbm_hf.cache as cache_mod

    monkeypatch.setattr(KvbmCache, "layered", None)
    monkeypatch.setattr(cache_mod, "_CPUS", 2)
    prompt = _prompt(6 * PAGE + 1, 7)
    _store_and_poison(model, manager, prompt)
    before = torch.get_num_threads()
    torch.set_num_threads(2 if threads == "all" else 1)
    try:
        with torch.inference_mode():
            cache = KvbmCache(manager, model)
            assert cache.load_prefix(prompt) == 6 * PAGE
            assert (cache.fill is not None) == (threads == "one")
            cache.wait_loaded()
    finally:
        torch.set_num_threads(before)
    assert manager.flush(10)
