"""The transformers connector's shortcuts on the request path give what the long way gives.

Each shortcut (the config read once per model, token ids read through numpy, the
copy's address table in one pass) has a test here that fails if the shortcut answered
differently from the long way: a stale dtype, other token bytes, a strided buffer
taken for one run.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvbm import LayoutError  # noqa: E402
from kvbm.connectors.hf import KvbmCache, manager_for_model, prefill  # noqa: E402

PAGE = 4
VOCAB = 256


def _model(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def model() -> Any:
    return _model()


@pytest.fixture
def manager(model: Any) -> Any:
    with manager_for_model(model, tiers=[{"type": "host", "num_blocks": 64}], page_size=PAGE,
                           name="tiny-llama-request-path") as mgr:
        yield mgr


def test_model_converted_after_its_first_cache_is_checked_with_its_new_dtype(
        model: Any, manager: Any) -> None:
    KvbmCache(manager, model)  # the config's facts are read and kept here
    model.to(torch.float16)
    try:
        # The model now computes float16 KV; the manager stores float32: an error naming
        # the dtype, not a float32 room the model would write float16 into.
        with pytest.raises(LayoutError, match="dtype: model 'float16', kvbm 'float32'"):
            KvbmCache(manager, model)
    finally:
        model.to(torch.float32)
    assert KvbmCache(manager, model).spec is not None  # and float32 again


def test_each_model_gets_its_own_config_facts(manager: Any) -> None:
    from kvbm_hf._model import config_facts

    a, b = _model(0), _model(1)
    b.config.num_key_value_heads = 4  # as if another architecture (its layers are unchanged)
    assert config_facts(a).kv_heads == 2
    assert config_facts(b).kv_heads == 4
    assert config_facts(a) is config_facts(a)  # read once, kept


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_token_ids_of_any_integer_dtype_load_the_same_prefix_bytes(model: Any, manager: Any,
                                                                   dtype: Any) -> None:
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, VOCAB, (1, 6 * PAGE + 1), generator=g)
    with torch.inference_mode():
        first = KvbmCache(manager, model)
        prefill(model, prompt, first, offload_wait=True)
        again = KvbmCache(manager, model)
        n = again.load_prefix(prompt.to(dtype))
        one_d = KvbmCache(manager, model)
        n1 = one_d.load_prefix(prompt[0].to(dtype))
    assert n == n1 == 6 * PAGE
    for cache in (again, one_d):
        for la, lb in zip(first.layers, cache.layers):
            assert torch.equal(la.keys[:, :, :n], lb.keys)
            assert torch.equal(la.values[:, :, :n], lb.values)


def test_token_ids_that_are_not_a_row_of_integers_are_still_refused(model: Any,
                                                                    manager: Any) -> None:
    from kvbm import TokenError

    cache = KvbmCache(manager, model)
    with pytest.raises(TokenError, match="expected integer token ids, got torch.float32"):
        cache.load_prefix(torch.zeros(1, 9))
    with pytest.raises(TokenError, match=r"expected \[batch, seq\] token ids, got shape \[1, 1, 9\]"):
        cache.load_prefix(torch.zeros(1, 1, 9, dtype=torch.long))


def test_addresses_refuse_strided_or_wrong_sized_buffers() -> None:
    from kvbm_hf._blocks import _addresses

    arena = np.zeros((4, 64), dtype=np.uint8)
    rows = [arena[i] for i in range(4)]
    got = _addresses(rows, 64)
    assert got is not None
    assert [int(a) for a in got] == [arena.ctypes.data + 64 * i for i in range(4)]
    assert _addresses([arena[1, :32], arena[0, ::2]], 32) is None  # 32 bytes, strided second
    assert _addresses(rows, 32) is None


def test_copy_in_of_a_block_index_out_of_range_names_it() -> None:
    from kvbm.layout import BlockLayout, ModelSpec
    from kvbm_hf._blocks import CacheBlockDestination

    layout = BlockLayout(ModelSpec(2, 2, 8, "float32"), PAGE)
    dest = CacheBlockDestination(layout, 3, capacity=4 * PAGE)
    src = [np.zeros(layout.bytes_per_block, dtype=np.uint8) for _ in range(2)]
    with pytest.raises(LayoutError, match=r"block index 3 is out of range \[0, 3\)"):
        dest.copy_in([0, 3], src)


def test_negative_token_id_is_refused_naming_it(model: Any, manager: Any) -> None:
    from kvbm import TokenError

    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    prompt[0, 4] = -3  # seen as unsigned by the range check: larger than any vocabulary
    with pytest.raises(TokenError, match=r"ids must lie in \[0, 256\) .* got min -3 and max"):
        KvbmCache(manager, model).load_prefix(prompt)


@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=64))
@settings(max_examples=200, deadline=None)
def test_range_check_maximum_is_the_largest_id_seen_unsigned(ids: list[int]) -> None:
    # ``umax`` (argmax, one C call) stands for ``view(uint64).max()`` in the token-id and
    # block-index range checks: a negative id must come out larger than any bound.
    from kvbm_hf._blocks import umax

    assert umax(np.array(ids, dtype=np.int64)) == max(x % 2**64 for x in ids)
