"""The Hugging Face transformers connector, run with a real (tiny, random) Llama model.

Every test builds its model from a small ``LlamaConfig`` with seeded weights, fp32 on
CPU; nothing is downloaded. "Without kvbm" is the same model run as transformers runs
it by default: a plain forward or ``generate`` over the whole prompt.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

from kvbm import KvBlockManager, LayoutError, TokenError  # noqa: E402
from kvbm.connectors import hf  # noqa: E402
from kvbm.connectors.hf import (  # noqa: E402
    KvbmCache,
    generate,
    manager_for_model,
    model_spec,
    prefill,
    unsupported_reason,
)

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


@pytest.fixture
def disk_manager(model: Any, tmp_path: Path) -> Any:
    pytest.importorskip("kvbm_tiers_disk.tier", reason="the disk tier is not built yet")
    # The disk tier's default admission waits for a block's second offer (Dynamo's
    # frequency filter); admit every block so the first turn's blocks are there to load.
    tiers = [{"type": "disk", "num_blocks": 128, "path": str(tmp_path), "admission": "all"}]
    with manager_for_model(model, tiers=tiers, page_size=PAGE, name="tiny-llama-seed0") as mgr:
        yield mgr


def tokens(n: int, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g)


def greedy_turns(model: Any, manager: Any, turns: list[Any], new_tokens: int = 6) -> list[dict[str, Any]]:
    """Run a conversation turn by turn with kvbm and without; return what each turn saw.

    A turn's prompt is the previous turn's prompt and answer plus the new user tokens, so
    from the second turn on the cached prefix covers earlier turns' answers too.
    """
    out: list[dict[str, Any]] = []
    history = torch.empty((1, 0), dtype=torch.long)
    with torch.inference_mode():
        for user in turns:
            prompt = torch.cat([history, user], dim=1)
            plain_logits = model(prompt).logits[:, -1]
            cache = KvbmCache(manager, model)
            kv_logits = prefill(model, prompt, cache, offload=False).logits[:, -1]
            loaded = cache.loaded_tokens
            # What the previous turn stored: its sequence's complete blocks, except the
            # last generated token (whose KV the model never computed).
            stored = max(history.shape[1] - 1, 0) // PAGE
            expected = min(stored, (prompt.shape[1] - 1) // PAGE) * PAGE
            plain = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
            with_kvbm = generate(model, prompt, manager, max_new_tokens=new_tokens, do_sample=False)
            manager.flush()
            out.append({"loaded": loaded, "expected": expected,
                        "logit_diff": float((kv_logits - plain_logits).abs().max()),
                        "plain": plain[0].tolist(), "kvbm": with_kvbm[0].tolist()})
            history = plain
    return out


CONVERSATION = [tokens(21, 1), tokens(9, 2), tokens(14, 3), tokens(5, 4)]


def check_conversation(turns: list[dict[str, Any]]) -> None:
    for i, t in enumerate(turns):
        assert t["logit_diff"] <= TOL, f"turn {i}: logits differ by {t['logit_diff']}"
        assert t["kvbm"] == t["plain"], f"turn {i}: greedy tokens differ"
    # The first turn has nothing cached; every later one reuses all earlier turns'
    # complete blocks (prompt and answer).
    assert turns[0]["loaded"] == 0
    assert all(t["expected"] > 0 for t in turns[1:])
    assert [t["loaded"] for t in turns] == [t["expected"] for t in turns]


def test_conversation_from_host_tier_matches_plain_model(model: Any, host_manager: Any) -> None:
    turns = greedy_turns(model, host_manager, CONVERSATION)
    check_conversation(turns)
    assert host_manager.stats()["paths"]["onboard:host"]["blocks"] > 0


def test_conversation_from_disk_tier_matches_plain_model(model: Any, disk_manager: Any) -> None:
    turns = greedy_turns(model, disk_manager, CONVERSATION)
    check_conversation(turns)
    assert disk_manager.stats()["paths"]["onboard:disk"]["blocks"] > 0


def test_loaded_blocks_come_from_the_tier_that_holds_them(model: Any, host_manager: Any) -> None:
    prompt = tokens(33, 7)
    with torch.inference_mode():
        prefill(model, prompt, KvbmCache(host_manager, model))
    host_manager.flush()  # prefill stores in the background
    with host_manager.match_prefix(prompt[0]) as m:
        assert m.num_blocks == 33 // PAGE
        assert set(m.tiers) == {"host"}


def test_last_prompt_token_is_always_computed(model: Any, host_manager: Any) -> None:
    prompt = tokens(4 * PAGE, 8)  # a whole number of blocks, every one cached below
    with torch.inference_mode():
        plain = model(prompt).logits[:, -1]
        prefill(model, prompt, KvbmCache(host_manager, model))
        cache = KvbmCache(host_manager, model)
        out = prefill(model, prompt, cache)
    assert cache.loaded_tokens == 3 * PAGE
    assert out.logits.shape[1] == PAGE
    assert float((out.logits[:, -1] - plain).abs().max()) <= TOL


def test_prompt_without_complete_block_passes_through(model: Any, host_manager: Any) -> None:
    prompt = tokens(PAGE, 9)  # one block, but its last token must be computed
    with torch.inference_mode():
        plain = model(prompt).logits[:, -1]
        cache = KvbmCache(host_manager, model)
        out = prefill(model, prompt, cache)
        again = KvbmCache(host_manager, model)
        assert again.load_prefix(prompt) == 0
    assert cache.loaded_tokens == 0
    assert float((out.logits[:, -1] - plain).abs().max()) == 0.0


def test_offload_stores_only_complete_blocks(model: Any, host_manager: Any) -> None:
    prompt = tokens(3 * PAGE + 2, 10)
    with torch.inference_mode():
        cache = KvbmCache(host_manager, model)
        model(prompt, past_key_values=cache)
        res = cache.offload_blocks(prompt)
    assert res.stored == 3
    assert host_manager.stats()["tiers"]["host"]["used_blocks"] == 3


def test_offload_offers_each_block_once_per_cache(model: Any, host_manager: Any) -> None:
    prompt = tokens(3 * PAGE, 11)
    with torch.inference_mode():
        cache = KvbmCache(host_manager, model)
        model(prompt, past_key_values=cache)
        first = cache.offload_blocks(prompt)
        second = cache.offload_blocks(prompt)
    assert (first.stored, second.stored, second.present) == (3, 0, 0)


def test_background_offload_stores_blocks_for_the_next_request(model: Any, host_manager: Any) -> None:
    prompt = tokens(5 * PAGE + 1, 12)
    with torch.inference_mode():
        cache = KvbmCache(host_manager, model)
        model(prompt, past_key_values=cache)
        fut = cache.offload_blocks(prompt, wait=False)
        model(tokens(1, 13), past_key_values=cache)  # the model runs on meanwhile
        assert fut.result(timeout=30).stored == 5
        assert KvbmCache(host_manager, model).load_prefix(prompt) == 5 * PAGE


def test_layout_mismatch_is_an_error_naming_each_field(model: Any) -> None:
    cfg = {"model": {"name": "x", "num_layers": 3, "num_kv_heads": 2, "head_dim": 8,
                     "dtype": "float16"}, "page_size": PAGE,
           "tiers": [{"type": "host", "num_blocks": 8}]}
    with KvBlockManager.from_config(cfg) as mgr, pytest.raises(LayoutError) as e:
        KvbmCache(mgr, model)
    msg = str(e.value)
    assert "num_layers: model 2, kvbm 3" in msg
    assert "head_dim: model 16, kvbm 8" in msg
    assert "dtype: model 'float32', kvbm 'float16'" in msg
    assert "manager_for_model" in msg


def test_tensor_parallel_manager_is_an_error(model: Any) -> None:
    with manager_for_model(model, tiers=[{"type": "host", "num_blocks": 8}], page_size=PAGE,
                           tp_size=2) as mgr, pytest.raises(LayoutError, match="tp_size"):
        KvbmCache(mgr, model)


def test_tokenizer_larger_than_model_vocab_is_an_error(model: Any, host_manager: Any) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(VOCAB + 44)}
    vocab["[UNK]"] = len(vocab)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    )
    with pytest.raises(TokenError, match=r"has 301 tokens but the model's vocab_size is 256"):
        KvbmCache(host_manager, model, tokenizer=tok)


def test_token_ids_outside_the_model_vocab_are_an_error(model: Any, host_manager: Any) -> None:
    prompt = tokens(9, 14)
    prompt[0, 3] = VOCAB + 5
    with pytest.raises(TokenError, match=r"\[0, 256\).*max 261"):
        KvbmCache(host_manager, model).load_prefix(prompt)


def test_sliding_window_model_runs_without_reuse_said_once(caplog: Any) -> None:
    torch.manual_seed(1)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        sliding_window=8)
    mistral = MistralForCausalLM(cfg).eval()
    assert "sliding_attention" in (unsupported_reason(mistral) or "")
    hf._said.clear()
    caplog.set_level(logging.INFO, logger="kvbm")
    prompt = tokens(20, 15)
    with manager_for_model(mistral, tiers=[{"type": "host", "num_blocks": 16}],
                           page_size=PAGE) as mgr, torch.inference_mode():
        plain = mistral(prompt).logits[:, -1]
        outs = []
        for _ in range(2):
            cache = KvbmCache(mgr, mistral)
            outs.append(prefill(mistral, prompt, cache).logits[:, -1])
            assert cache.loaded_tokens == 0
        assert mgr.stats()["tiers"]["host"]["used_blocks"] == 0
    said = [r for r in caplog.records if "without prefix reuse" in r.getMessage()]
    assert len(said) == 1
    assert all(float((o - plain).abs().max()) == 0.0 for o in outs)


def test_batch_of_two_runs_without_reuse(model: Any, host_manager: Any) -> None:
    prompt = torch.cat([tokens(12, 16), tokens(12, 17)])
    with torch.inference_mode():
        plain = model(prompt).logits[:, -1]
        out = prefill(model, prompt, KvbmCache(host_manager, model))
    assert float((out.logits[:, -1] - plain).abs().max()) == 0.0
    assert host_manager.stats()["tiers"]["host"]["used_blocks"] == 0


def test_manager_for_model_reads_the_transformers_config(model: Any) -> None:
    spec = model_spec(model)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (2, 2, 16, "float32")
    with manager_for_model(model, tiers=[{"type": "host", "num_blocks": 8}], page_size=PAGE) as mgr:
        assert mgr.layout.block_shape == (2, 2, PAGE, 32)


def test_connector_is_registered_under_hf() -> None:
    from kvbm import build_plugins

    assert build_plugins().connectors.get("hf").load() is KvbmCache


def test_decoding_past_the_reserved_room_keeps_greedy_tokens(model: Any, host_manager: Any) -> None:
    prompt = tokens(6 * PAGE + 3, 18)
    with torch.inference_mode():
        plain = model.generate(prompt, max_new_tokens=8, do_sample=False)
        prefill(model, prompt, KvbmCache(host_manager, model))
        cache = KvbmCache(host_manager, model, headroom=2)  # room runs out after 2 new tokens
        assert cache.load_prefix(prompt) == 6 * PAGE
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert out[0].tolist() == plain[0].tolist()
    assert cache.get_seq_length() == prompt.shape[1] + 7


def test_loaded_prefix_and_new_tokens_share_one_buffer(model: Any, host_manager: Any) -> None:
    prompt = tokens(5 * PAGE + 2, 19)
    with torch.inference_mode():
        prefill(model, prompt, KvbmCache(host_manager, model))
        cache = KvbmCache(host_manager, model)
        n = cache.load_prefix(prompt)
        before = cache.layers[0].keys.data_ptr()
        model(prompt[:, n:], past_key_values=cache)
    # The rest of the prompt was appended after the loaded tokens, not concatenated
    # into a new tensor: the prefix's bytes were copied once, from the tier into place.
    assert cache.layers[0].keys.data_ptr() == before
    assert cache.get_seq_length() == prompt.shape[1]


@pytest.mark.gpu
def test_conversation_on_cuda_matches_plain_model(host_manager: Any) -> None:
    torch.manual_seed(0)
    gpu_model = LlamaForCausalLM(tiny_llama_config()).eval().to("cuda")
    prompt = tokens(4 * PAGE + 1, 20).to("cuda")
    with torch.inference_mode():
        plain = gpu_model(prompt).logits[:, -1]
        prefill(gpu_model, prompt, KvbmCache(host_manager, gpu_model))
        cache = KvbmCache(host_manager, gpu_model)
        out = prefill(gpu_model, prompt, cache)
    assert cache.loaded_tokens == 4 * PAGE
    assert cache.layers[0].keys.device.type == "cuda"
    assert float((out.logits[:, -1] - plain).abs().max()) <= TOL


def test_cache_that_already_holds_kv_is_left_as_it_is(model: Any, host_manager: Any) -> None:
    prompt = tokens(3 * PAGE + 1, 21)
    with torch.inference_mode():
        prefill(model, prompt, KvbmCache(host_manager, model))
        cache = KvbmCache(host_manager, model)
        model(prompt[:, :5], past_key_values=cache)
        assert cache.load_prefix(prompt) == 5
    assert cache.loaded_tokens == 0


# -- rooms reused across requests, offloads in the background ----------------------------
def test_back_to_back_requests_sharing_a_prefix_load_it_exactly(model: Any,
                                                                host_manager: Any) -> None:
    prefix = tokens(8 * PAGE, 30)
    first = torch.cat([prefix, tokens(3, 31)], dim=1)
    second = torch.cat([prefix, tokens(5, 32)], dim=1)
    with torch.inference_mode():
        a = KvbmCache(host_manager, model)
        prefill(model, first, a)  # stores in the background, no flush before the next
        stored = [layer.keys[:, :, :8 * PAGE].clone() for layer in a.layers]
        b = KvbmCache(host_manager, model)
        out = prefill(model, second, b)
        plain = model(second).logits[:, -1]
    assert b.loaded_tokens == 8 * PAGE  # waited for the first request's store
    for li, layer in enumerate(b.layers):
        assert torch.equal(layer.keys[:, :, :8 * PAGE], stored[li]), f"layer {li} keys"
    diff = (out.logits[:, -1].log_softmax(-1) - plain.log_softmax(-1)).abs().max()
    assert float(diff) <= TOL
