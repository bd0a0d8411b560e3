"""kvbm's vLLM connector against vLLM's real scheduler, on CPU.

The engine loop is vLLM's own: ``Scheduler.schedule()`` → the worker connectors run
the step's instructions on real KV tensors allocated by vLLM's ``allocate_kv_cache`` →
a fabricated ``ModelRunnerOutput`` per rank, merged by vLLM's ``KVOutputAggregator`` →
``Scheduler.update_from_output()``. The only stand-in is the model: its "forward"
writes, for every scheduled token, KV values that are a known function of (rank,
layer, token, position, head, channel), so any block's content can be checked.
vLLM's own prefix cache is off unless a test turns it on, so every reuse comes from kvbm.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import torch
    import vllm  # noqa: F401
except Exception as e:  # pragma: no cover - only where vLLM is absent
    pytest.skip(
        f"vLLM is not importable ({e!r}); install it as ../shared/notes/vllm-on-cpu.md says "
        "(pip install --no-deps vllm==0.33.0 plus requirements/vllm-cpu.txt)",
        allow_module_level=True,
    )

PAGE = 16
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
HEADS = 2
HEAD = 8
EOS = 50256


@pytest.fixture(scope="module")
def v(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """vLLM's modules (imported once: about 6 s) and a local tiny model folder."""
    from vllm import SamplingParams
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
        SlidingWindowSpec,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
    from vllm.v1.request import Request, RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.v1.worker.utils import allocate_kv_cache

    init_none_hash(sha256)
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": HEADS, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    }))
    return types.SimpleNamespace(
        SamplingParams=SamplingParams, CacheConfig=CacheConfig, DeviceConfig=DeviceConfig,
        KVTransferConfig=KVTransferConfig, ModelConfig=ModelConfig,
        SchedulerConfig=SchedulerConfig, VllmConfig=VllmConfig,
        KVOutputAggregator=KVOutputAggregator, sha256=sha256,
        get_request_block_hasher=get_request_block_hasher, Scheduler=Scheduler,
        FullAttentionSpec=FullAttentionSpec, KVCacheConfig=KVCacheConfig,
        KVCacheGroupSpec=KVCacheGroupSpec, KVCacheTensor=KVCacheTensor,
        SlidingWindowSpec=SlidingWindowSpec, KVCacheLayout=KVCacheLayout,
        KVConnectorOutput=KVConnectorOutput, ModelRunnerOutput=ModelRunnerOutput,
        Request=Request, RequestStatus=RequestStatus,
        StructuredOutputManager=StructuredOutputManager, allocate_kv_cache=allocate_kv_cache,
        model_dir=str(model_dir),
    )


def kv_value(rank: int, layer: int, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The stand-in model's KV: ``[n, heads, K|V]`` exact integers in float32."""
    h = torch.arange(HEADS).view(1, HEADS, 1)
    c = torch.arange(2 * HEAD).view(1, 1, 2 * HEAD)
    base = (tokens * 7 + pos * 13 + layer * 101 + rank * 1009).view(-1, 1, 1)
    return ((base + h * 17 + c) % 4093).to(torch.float32)


class Engine:
    """vLLM's scheduler, ``tp`` worker connectors with their KV tensors, and the loop."""

    def __init__(self, v: Any, *, tiers: list[dict[str, Any]], tp: int = 1,
                 num_blocks: int = 64, layout: str = "LBNHC", kernel_block: int | None = None,
                 load_mode: str = "auto", prefix_caching: bool = False,
                 max_batched: int = 512, extra: dict[str, Any] | None = None,
                 groups: Any = None, connector: str = "KvbmConnector",
                 module: str = "kvbm.connectors.vllm") -> None:
        self.v = v
        self.tp = tp
        mc = v.ModelConfig(model=v.model_dir, skip_tokenizer_init=True, dtype="float32",
                           seed=0, max_model_len=2048)
        sc = v.SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_batched,
                               max_model_len=2048, enable_chunked_prefill=True,
                               is_encoder_decoder=False)
        cc = v.CacheConfig(block_size=PAGE, enable_prefix_caching=prefix_caching)
        ex = {"kvbm": {"tiers": tiers}, "load_mode": load_mode, "publish_events": True}
        ex.update(extra or {})
        ktc = v.KVTransferConfig(kv_connector=connector, kv_connector_module_path=module,
                                 kv_role="kv_both", kv_connector_extra_config=ex,
                                 kv_load_failure_policy="recompute")
        self.vc = v.VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc,
                               kv_transfer_config=ktc, device_config=v.DeviceConfig("cpu"))
        self.vc.parallel_config.tensor_parallel_size = tp
        spec = v.FullAttentionSpec(block_size=PAGE, num_kv_heads=HEADS, head_size=HEAD,
                                   dtype=torch.float32)
        pg = spec.page_size_bytes
        n = len(LAYERS)
        if layout.startswith("L"):
            tensor = v.KVCacheTensor(size=pg * num_blocks * n, layers=LAYERS,
                                     layer_stride=pg * num_blocks, block_stride=pg)
        else:
            tensor = v.KVCacheTensor(size=pg * num_blocks * n, layers=LAYERS,
                                     layer_stride=pg, block_stride=pg * n)
        self.kcc = v.KVCacheConfig(
            num_blocks=num_blocks, kv_cache_tensors=[tensor],
            kv_cache_groups=groups or [v.KVCacheGroupSpec(LAYERS, spec)],
        )
        self.vc.cache_config.num_gpu_blocks = num_blocks
        self.sched = v.Scheduler(vllm_config=self.vc, kv_cache_config=self.kcc, log_stats=True,
                                 structured_output_manager=v.StructuredOutputManager(self.vc),
                                 block_size=PAGE)
        self.conn = self.sched.connector
        self.ratio = PAGE // kernel_block if kernel_block else 1
        self.workers: list[Any] = []
        self.kv: list[dict[str, torch.Tensor]] = []
        from kvbm.connectors.vllm import KvbmConnector

        for r in range(tp):
            vcr = copy.copy(self.vc)
            pc = copy.copy(self.vc.parallel_config)
            pc.rank = r
            vcr.parallel_config = pc
            w = KvbmConnector(vcr, _role("WORKER"), self.kcc)
            kv = v.allocate_kv_cache(self.kcc, torch.device("cpu"),
                                     getattr(v.KVCacheLayout, layout),
                                     kernel_block_sizes=[kernel_block] if kernel_block else None)
            w.register_kv_caches(kv)
            self.workers.append(w)
            self.kv.append(kv)
        # What vLLM's EngineCore does once the KV caches are registered: collect each
        # worker's handshake, keyed (pp_rank, tp_rank), and hand them to the scheduler's
        # connector before the first step.
        hs = {(0, r): m for r, w in enumerate(self.workers)
              if (m := w.get_handshake_metadata()) is not None}
        self.conn.set_xfer_handshake_metadata_pp_aware(hs)
        self.agg = v.KVOutputAggregator(expected_finished_count=tp)
        self.layer_order: list[str] = []
        self.step_outputs: list[Any] = []
        self.core_outputs: list[Any] = []

    # -- requests ------------------------------------------------------------------
    def add(self, req_id: str, tokens: list[int], max_tokens: int = 2) -> Any:
        sp = self.v.SamplingParams(max_tokens=max_tokens)
        sp.update_from_generation_config({}, EOS)
        req = self.v.Request(request_id=req_id, prompt_token_ids=list(tokens),
                             sampling_params=sp, pooling_params=None, mm_features=None,
                             block_hasher=self.v.get_request_block_hasher(PAGE, self.v.sha256))
        self.sched.add_request(req)
        return req

    # -- the engine step -----------------------------------------------------------
    def _write_layer(self, rank: int, li: int, name: str, so: Any) -> None:
        t = self.kv[rank][name]
        n_kernel = PAGE // self.ratio
        for req_id, n in so.num_scheduled_tokens.items():
            req = self.sched.requests[req_id]
            start = req.num_computed_tokens - n
            end = min(start + n, req.num_tokens)
            if end <= start:
                continue
            ids = torch.tensor(self.sched.kv_cache_manager.get_block_ids(req_id)[0])
            pos = torch.arange(start, end)
            toks = torch.tensor(list(req.all_token_ids[start:end]))
            blocks = ids[pos // PAGE] * self.ratio + (pos % PAGE) // n_kernel
            t[blocks, :, pos % n_kernel, :] = kv_value(rank, li, toks, pos)

    def step(self, after_layer_load: Any = None) -> Any:
        so = self.sched.schedule()
        meta = so.kv_connector_metadata
        for w in self.workers:
            w.bind_connector_metadata(meta)
            w.start_load_kv(None)
        for li, name in enumerate(LAYERS):
            for r, w in enumerate(self.workers):
                w.wait_for_layer_load(name)
                if after_layer_load is not None:
                    after_layer_load(r, li, so)
                self._write_layer(r, li, name, so)
                w.save_kv_layer(name, self.kv[r][name], None)
        outs = []
        req_ids = list(so.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            req = self.sched.requests[rid]
            sampled.append([100 + req.num_tokens % 50] if req.num_computed_tokens >= req.num_tokens
                           else [])
        for w in self.workers:
            w.wait_for_save()
            res = w.get_transfer_results(so.finished_req_ids)
            kco = self.v.KVConnectorOutput(
                finished_sending=res.finished_sending or None,
                finished_recving=res.finished_recving or None,
                failed_recving=res.failed_recving,
                invalid_block_ids=w.get_block_ids_with_load_errors(),
                kv_connector_worker_meta=w.build_connector_worker_meta(),
            )
            w.clear_connector_metadata()
            outs.append(self.v.ModelRunnerOutput(
                req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                sampled_token_ids=[list(s) for s in sampled], logprobs=None,
                prompt_logprobs_dict={}, pooler_output=None, kv_connector_output=kco))
        out = self.agg.aggregate(outs)
        self.core_outputs.append(self.sched.update_from_output(so, out))
        self.step_outputs.append(so)
        return so

    def run(self, until: Any = None, max_steps: int = 200, seconds: float = 20.0) -> None:
        """Step until ``until()`` (default: no request left), waiting on async loads."""
        deadline = time.monotonic() + seconds
        done = until or (lambda: not self.sched.requests)
        for _ in range(max_steps):
            if done():
                return
            self.step()
            if not self.sched.running and self.sched.requests:
                time.sleep(0.002)  # an async load runs on a worker thread
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"engine did not finish: {self.sched.requests.keys()}")

    # -- inspection ----------------------------------------------------------------
    def block_kv(self, rank: int, name: str, block: int) -> torch.Tensor:
        """One manager block of one layer as ``[tokens, heads, K|V]``."""
        t = self.kv[rank][name]
        n_kernel = PAGE // self.ratio
        parts = [t[block * self.ratio + j].permute(1, 0, 2) for j in range(self.ratio)]
        assert parts[0].shape[0] == n_kernel
        return torch.cat(parts, dim=0)

    def assert_prefix_kv(self, req: Any, n_blocks: int) -> None:
        """Every rank's first ``n_blocks`` blocks of ``req`` hold that rank's expected KV."""
        ids = self.sched.kv_cache_manager.get_block_ids(req.request_id)[0]
        for r in range(self.tp):
            for li, name in enumerate(LAYERS):
                for i in range(n_blocks):
                    pos = torch.arange(i * PAGE, (i + 1) * PAGE)
                    toks = torch.tensor(list(req.all_token_ids[i * PAGE : (i + 1) * PAGE]))
                    want = kv_value(r, li, toks, pos)
                    got = self.block_kv(r, name, ids[i])
                    assert torch.equal(got, want), f"rank {r} layer {li} block {i} differs"

    def scrub(self) -> None:
        """Overwrite every engine block, so later content can only come from kvbm."""
        for kv in self.kv:
            for t in kv.values():
                t.fill_(-1.0)

    @property
    def side(self) -> Any:
        return self.conn.scheduler_side

    def pins(self) -> int:
        return sum(tm.registry.pins_at(s) for tm in self.side.tiers
                   for s in range(tm.registry.capacity))

    def drain(self) -> None:
        for w in self.workers:
            if w.worker_side is not None:
                w.worker_side.drain(timeout=10)

    def close(self) -> None:
        for w in self.workers:
            w.shutdown()


def _role(name: str) -> Any:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    return KVConnectorRole[name]


@pytest.fixture
def make(v: Any) -> Iterator[Any]:
    engines: list[Engine] = []

    def build(**kw: Any) -> Engine:
        kw.setdefault("tiers", [{"type": "host", "num_blocks": 64}])
        e = Engine(v, **kw)
        engines.append(e)
        return e

    yield build
    for e in engines:
        e.close()


def prompt(n: int, seed: int = 1) -> list[int]:
    return [(seed * 131 + i * 7) % 997 + 1 for i in range(n)]


def first_step_for(e: Engine, req_id: str) -> Any:
    for so in e.step_outputs:
        for nr in so.scheduled_new_reqs:
            if nr.req_id == req_id:
                return so, nr
    raise AssertionError(f"{req_id} was never scheduled")


# --- hits and misses ---------------------------------------------------------------


def test_repeated_prompt_loads_matched_blocks_layerwise_and_computes_only_the_rest(make: Any) -> None:
    e = make()
    e.add("a", prompt(50))
    e.run()
    e.scrub()
    b = e.add("b", prompt(50), max_tokens=3)
    so = e.step()
    assert so.kv_connector_metadata.loads and so.kv_connector_metadata.loads[0].layerwise
    assert so.num_scheduled_tokens["b"] == 50 - 48
    e.assert_prefix_kv(b, 3)
    e.run()
    assert e.side.loaded_blocks == 3 and e.side.failed_blocks == 0


def test_full_prompt_hit_still_leaves_one_token_to_compute(make: Any) -> None:
    e = make()
    e.add("a", prompt(48))
    e.run()
    e.add("b", prompt(48), max_tokens=3)
    so = e.step()
    # 3 complete blocks are cached, but the last token must be computed to sample.
    assert so.num_scheduled_tokens["b"] == 16
    e.run()


def test_unseen_prompt_is_a_miss_with_no_load(make: Any) -> None:
    e = make()
    e.add("a", prompt(50, seed=1))
    e.run()
    e.add("b", prompt(50, seed=2))
    so = e.step()
    assert so.kv_connector_metadata.loads == []
    assert so.num_scheduled_tokens["b"] == 50
    e.run()


def test_shared_prefix_hit_stops_at_first_differing_block(make: Any) -> None:
    e = make()
    e.add("a", prompt(64))
    e.run()
    e.scrub()
    toks = prompt(64)
    toks[40] += 1  # block 2 differs
    b = e.add("b", toks, max_tokens=3)
    so = e.step()
    assert so.num_scheduled_tokens["b"] == 64 - 32
    e.assert_prefix_kv(b, 4)
    e.run()


def test_prompt_without_a_complete_block_is_neither_matched_nor_saved(make: Any) -> None:
    e = make()
    e.add("a", prompt(10), max_tokens=1)
    so = e.step()
    assert so.kv_connector_metadata.saves == [] and so.kv_connector_metadata.loads == []
    e.run()
    assert e.side.saved_blocks == 0


def test_local_prefix_cache_hit_loads_only_blocks_beyond_it(make: Any) -> None:
    e = make(prefix_caching=True, num_blocks=12)
    e.add("a", prompt(64), max_tokens=1)
    e.run()
    # Push "a"'s blocks out of vLLM's own cache, keeping the first one.
    e.add("x", prompt(16) + prompt(150, seed=9), max_tokens=1)
    e.run()
    b = e.add("b", prompt(64), max_tokens=3)
    so = e.step()
    loads = so.kv_connector_metadata.loads
    assert loads, "kvbm should supply the blocks vLLM no longer holds"
    local = so.scheduled_new_reqs[0].num_computed_tokens - 16 * len(loads[0].dst)
    assert local >= 16 and so.num_scheduled_tokens["b"] == 64 - 48
    e.assert_prefix_kv(b, 3)
    e.run()


def test_layer_load_waits_for_its_own_layer_only(make: Any) -> None:
    e = make()
    e.add("a", prompt(50))
    e.run()
    e.scrub()
    engine = e.workers[0].worker_side.engine
    gate = threading.Event()
    real = engine.copy_layer_in

    slept: list[bool] = []

    def slow_layer1(li: int, indices: Any, src: Any) -> Any:
        if li == 0 and not slept:
            slept.append(True)
            time.sleep(0.3)  # a wait that returned early would see layer 0 unloaded
        if li == 1:
            gate.wait(10)
        return real(li, indices, src)

    engine.copy_layer_in = slow_layer1
    b = e.add("b", prompt(50), max_tokens=3)
    seen: list[tuple[bool, bool]] = []

    def check(rank: int, li: int, so: Any) -> None:
        if li == 0 and not seen:
            ids = e.sched.kv_cache_manager.get_block_ids("b")[0]
            layer0 = e.block_kv(0, LAYERS[0], ids[0])
            layer1 = e.block_kv(0, LAYERS[1], ids[0])
            seen.append((bool((layer0 >= 0).all()), bool((layer1 == -1).all())))
            gate.set()

    e.step(after_layer_load=check)
    # Layer 0 was usable while layer 1 was still being copied.
    assert seen == [(True, True)]
    e.assert_prefix_kv(b, 3)
    e.run()


# --- async loads and lower tiers ---------------------------------------------------


def test_async_load_parks_request_until_workers_finish(make: Any, v: Any) -> None:
    e = make(load_mode="async")
    e.add("a", prompt(50))
    e.run()
    e.scrub()
    b = e.add("b", prompt(50), max_tokens=3)
    so = e.step()
    assert "b" not in so.num_scheduled_tokens
    assert b.status == v.RequestStatus.WAITING_FOR_REMOTE_KVS
    e.run(until=lambda: "b" in e.step_outputs[-1].num_scheduled_tokens)
    assert e.step_outputs[-1].num_scheduled_tokens["b"] == 2
    e.assert_prefix_kv(b, 3)
    e.run()
    assert e.pins() == 0


def test_write_through_cascade_serves_evicted_blocks_from_lower_tier_asynchronously(
    make: Any, v: Any
) -> None:
    e = make(tiers=[{"type": "host", "name": "small", "num_blocks": 4},
                    {"type": "host", "name": "big", "num_blocks": 64}])
    e.add("a", prompt(64), max_tokens=1)
    e.run()
    settle(e)  # "a"'s 4 blocks cascade into the big tier
    e.add("x", prompt(64, seed=5), max_tokens=1)  # evicts "a" from the small tier
    e.run()
    settle(e)
    assert e.side.tiers[1].registry.num_used == 8
    assert e.side.tiers[0].registry.num_used == 4
    e.scrub()
    b = e.add("b", prompt(64), max_tokens=3)
    so = e.step()
    assert b.status == v.RequestStatus.WAITING_FOR_REMOTE_KVS, "a lower-tier hit loads async"
    assert 1 in so.kv_connector_metadata.loads[0].tiers
    e.run(until=lambda: "b" in e.step_outputs[-1].num_scheduled_tokens)
    e.assert_prefix_kv(b, 3)
    e.run()


# --- failures -----------------------------------------------------------------------


def _failing_reads(tier: Any, fail_slots: set[int]) -> None:
    """Make a real host tier's reads fail for some slots, as a bad checksum would.

    The tier then serves blocks through ``read`` (no views), copying its real bytes.
    """
    tier.fail_slots = set(fail_slots)
    if "read" in tier.__dict__:
        return
    real_views = type(tier).views.__get__(tier)

    def views(slots: Any) -> None:
        return None

    def read(slots: Any, keys: Any, dst: Any) -> list[bool]:
        for d, g in zip(dst, real_views(slots)):
            d[:] = g
        return [s not in tier.fail_slots for s in slots]

    tier.views = views
    tier.read = read


def settle(e: Engine) -> None:
    """Let background copies finish and their reports reach the scheduler side."""
    for _ in range(3):
        e.step()
        e.drain()


@pytest.mark.parametrize("load_mode", ["layerwise", "async"])
def test_failed_block_load_is_reported_recomputed_and_saved_again(make: Any,
                                                                 load_mode: str) -> None:
    e = make(load_mode=load_mode)
    e.add("a", prompt(64), max_tokens=1)
    e.run()
    hashes = e.side._hashers[(None, None)].hash_tokens(prompt(64))
    bad = e.side.tiers[0].registry.lookup(hashes[1])
    _failing_reads(e.workers[0].worker_side.tiers[0], {bad})
    e.scrub()
    b = e.add("b", prompt(64), max_tokens=3)
    e.run(until=lambda: b.num_output_tokens >= 1)
    assert e.side.failed_blocks == 1 and e.side.loaded_blocks == 2
    # vLLM was told: it recomputed from the failed block, and its KV is right everywhere.
    computed = sum(so.num_scheduled_tokens.get("b", 0) for so in e.step_outputs)
    assert computed >= 64 - 16
    e.assert_prefix_kv(b, 4)
    e.run()
    # The bad copy was dropped and "b" saved the recomputed blocks: a later request
    # loads all three intact.
    _failing_reads(e.workers[0].worker_side.tiers[0], set())
    settle(e)
    e.scrub()
    c = e.add("c", prompt(64), max_tokens=3)
    e.run(until=lambda: c.num_computed_tokens >= 64)
    e.assert_prefix_kv(c, 4)
    assert e.side.loaded_blocks >= 2 + 3
    e.run()
    assert e.pins() == 0


def test_blocks_computed_on_a_failed_load_are_never_stored(make: Any) -> None:
    e = make(load_mode="layerwise")
    e.add("a", prompt(64), max_tokens=1)
    e.run()
    hashes = e.side._hashers[(None, None)].hash_tokens(prompt(64))
    _failing_reads(e.workers[0].worker_side.tiers[0],
                   {e.side.tiers[0].registry.lookup(hashes[0])})
    e.scrub()
    b = e.add("b", prompt(64) + prompt(16, seed=3), max_tokens=3)
    so1 = e.step()
    # Step 1 loaded blocks 0-3 (block 0 failed) and computed block 4 on top of them;
    # block 4 must not reach kvbm, and vLLM rewinds "b" to token 0.
    assert so1.num_scheduled_tokens.get("b") == 16
    h4 = e.side._hashers[(None, None)].hash_tokens(list(b.all_token_ids[:80]))[4]
    assert e.side.tiers[0].registry.lookup(h4) is None
    so2 = e.step()
    assert so2.num_scheduled_tokens.get("b") == 80
    e.assert_prefix_kv(b, 5)
    e.run()


# --- preemption, finished and aborted requests --------------------------------------


def test_preempted_request_resumes_by_loading_its_saved_blocks(make: Any) -> None:
    e = make(num_blocks=10)  # 9 usable blocks
    a = e.add("a", prompt(64, seed=1), max_tokens=40)
    b = e.add("b", prompt(64, seed=2), max_tokens=40)
    e.run(until=lambda: b.num_preemptions > 0 or a.num_preemptions > 0)
    victim, other = (b, a) if b.num_preemptions else (a, b)
    # Every engine block the running request does not hold is overwritten, so the
    # victim's KV can come back only through kvbm.
    keep = set(e.sched.kv_cache_manager.get_block_ids(other.request_id)[0])
    for kv in e.kv:
        for t in kv.values():
            for blk in range(t.shape[0]):
                if blk // e.ratio not in keep:
                    t[blk].fill_(-1.0)
    loads_before = e.side.loaded_blocks
    for _ in range(100):
        so = e.step()
        loads = [op for op in so.kv_connector_metadata.loads if op.req_id == victim.request_id]
        if loads:
            break
    else:
        raise AssertionError("the preempted request never loaded from kvbm")
    assert loads[0].layerwise
    e.assert_prefix_kv(victim, len(loads[0].dst))  # the loaded bytes, layer by layer
    e.run()
    assert e.side.loaded_blocks > loads_before
    assert e.pins() == 0


def test_blocks_no_tier_had_a_slot_for_are_reported_as_not_saved(make: Any) -> None:
    e = make(tiers=[{"type": "host", "num_blocks": 2}])
    e.add("a", prompt(80), max_tokens=1)  # 5 blocks in one step, 2 slots
    e.run()
    # What vLLM's stats logger receives, summed over the steps.
    logged = [eco.scheduler_stats.kv_connector_stats for outs in e.core_outputs
              for eco in outs.values() if eco.scheduler_stats is not None
              and eco.scheduler_stats.kv_connector_stats]
    assert sum(st.get("not_saved_blocks", 0) for st in logged) == 3
    assert e.side.stats()["not_saved_blocks"] == 3


def test_scheduler_keeps_a_bounded_number_of_hashers(make: Any, v: Any) -> None:
    from kvbm.ranks import MAX_HASHERS

    e = make()
    for i in range(MAX_HASHERS + 40):
        sp = v.SamplingParams(max_tokens=1)
        req = v.Request(request_id=f"s{i}", prompt_token_ids=prompt(40), sampling_params=sp,
                        pooling_params=None, mm_features=None, cache_salt=f"tenant-{i}")
        e.conn.get_num_new_matched_tokens(req, 0)
        e.conn.request_finished(req, [])
    assert len(e.side._hashers) <= MAX_HASHERS


def test_finished_requests_leave_no_pins_and_no_pending_work(make: Any) -> None:
    e = make()
    for i in range(3):
        e.add(f"r{i}", prompt(40 + 8 * i, seed=i % 2), max_tokens=3)
    e.run()
    e.drain()
    e.step()
    assert e.pins() == 0
    assert e.side.stats()["pending_ops"] == 0
    assert not e.side.reqs


def test_abort_during_async_load_keeps_blocks_until_the_load_reports(make: Any, v: Any) -> None:
    e = make(load_mode="async")
    e.add("a", prompt(50))
    e.run()
    ws = e.workers[0].worker_side
    gate = threading.Event()
    real = ws._load

    def slow(ops: Any, events: Any) -> None:
        gate.wait(10)
        real(ops, events)

    ws._load = slow
    e.add("b", prompt(50))
    e.step()
    e.sched.finish_requests("b", v.RequestStatus.FINISHED_ABORTED)
    assert "b" in e.sched.requests, "blocks stay while the load may still write them"
    gate.set()
    e.run()
    assert "b" not in e.sched.requests
    assert e.pins() == 0


# --- tensor parallel and layouts ----------------------------------------------------


def test_tp2_workers_each_get_back_their_own_shard(make: Any) -> None:
    e = make(tp=2)
    e.add("a", prompt(50))
    e.run()
    assert e.side.saved_blocks == 3  # committed once both ranks reported
    e.scrub()
    b = e.add("b", prompt(50), max_tokens=3)
    e.step()
    e.assert_prefix_kv(b, 3)  # rank r's values include r: a swapped shard fails here
    e.run()
    assert e.side.loaded_blocks == 3


def test_tp2_block_is_committed_only_when_every_rank_wrote_it(make: Any) -> None:
    e = make(tp=2)
    e.add("a", prompt(32), max_tokens=1)
    so = e.sched.schedule()
    ws = [w for w in e.workers]
    for w in ws:
        w.bind_connector_metadata(so.kv_connector_metadata)
        w.start_load_kv(None)
        for name in LAYERS:
            w.save_kv_layer(name, None, None)
        w.wait_for_save()
    only_rank0 = ws[0].build_connector_worker_meta()
    ws[1].build_connector_worker_meta()
    e.conn.update_connector_output(e.v.KVConnectorOutput(kv_connector_worker_meta=only_rank0))
    h = e.side._hashers[(None, None)].hash_tokens(prompt(32))
    assert e.side.tiers[0].registry.lookup(h[0]) is None, "rank 1 has not reported"
    e.conn.update_connector_output(e.v.KVConnectorOutput(kv_connector_worker_meta=only_rank0))
    assert e.side.tiers[0].registry.lookup(h[0]) is not None


@pytest.mark.parametrize("layout,kernel", [("LBNHC", None), ("BLHNC", None), ("LBNHC", 8)])
def test_round_trip_through_each_vllm_kv_layout(make: Any, layout: str, kernel: int | None) -> None:
    e = make(layout=layout, kernel_block=kernel)
    e.add("a", prompt(50))
    e.run()
    e.scrub()
    b = e.add("b", prompt(50), max_tokens=3)
    e.step()
    e.assert_prefix_kv(b, 3)
    e.run()


# --- configuration, bad input, events -------------------------------------------------


def test_dynamo_connector_module_path_resolves_to_kvbm(make: Any, v: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from kvbm.connectors.vllm import KvbmConnector

    cls = KVConnectorFactory.get_connector_class(v.KVTransferConfig(
        kv_connector="DynamoConnector", kv_role="kv_both",
        kv_connector_module_path="kvbm.vllm_integration.connector"))
    assert issubclass(cls, KvbmConnector)
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "37")
    e = make(connector="DynamoConnector", module="kvbm.vllm_integration.connector",
             tiers=None, extra={"kvbm": None})
    assert e.side.tiers[0].registry.capacity == 37
    e.add("a", prompt(40))
    e.run()
    assert e.side.saved_blocks == 2


def test_kvbm_model_that_disagrees_with_vllm_is_a_config_error(make: Any) -> None:
    from kvbm.errors import ConfigError

    with pytest.raises(ConfigError, match="does not match vLLM"):
        make(extra={"kvbm": {"tiers": [{"type": "host", "num_blocks": 8}],
                             "model": {"num_layers": 40, "num_kv_heads": 2, "head_dim": 8,
                                       "dtype": "float32"}}})


def test_hybrid_attention_model_passes_through_without_reuse(
    v: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from kvbm.connectors.vllm import KvbmConnector

    full = v.FullAttentionSpec(block_size=PAGE, num_kv_heads=HEADS, head_size=HEAD,
                               dtype=torch.float32)
    swa = v.SlidingWindowSpec(block_size=PAGE, num_kv_heads=HEADS, head_size=HEAD,
                              dtype=torch.float32, sliding_window=32)
    kcc = v.KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[
        v.KVCacheGroupSpec(LAYERS[:1], full), v.KVCacheGroupSpec(LAYERS[1:], swa)])
    ktc = v.KVTransferConfig(kv_connector="KvbmConnector", kv_role="kv_both",
                             kv_connector_module_path="kvbm.connectors.vllm")
    vc = v.VllmConfig(model_config=v.ModelConfig(model=v.model_dir, skip_tokenizer_init=True,
                                                 dtype="float32", max_model_len=2048),
                      kv_transfer_config=ktc, device_config=v.DeviceConfig("cpu"))
    caplog.set_level(logging.WARNING, logger="kvbm.vllm")
    c = KvbmConnector(vc, _role("SCHEDULER"), kcc)
    assert c.passthrough is not None and "hybrid" in c.passthrough
    req = v.Request(request_id="h", prompt_token_ids=prompt(40),
                    sampling_params=v.SamplingParams(), pooling_params=None, mm_features=None)
    assert c.get_num_new_matched_tokens(req, 0) == (0, False)
    said = [r for r in caplog.records if r.name == "kvbm.vllm" and "hybrid" in r.getMessage()]
    assert len(said) == 1


def test_take_events_reports_stored_blocks_under_vllm_block_hashes(make: Any) -> None:
    e = make()
    batches: list[Any] = []
    e.sched.kv_event_publisher = types.SimpleNamespace(publish=batches.append,
                                                       shutdown=lambda: None)
    a = e.add("a", prompt(50), max_tokens=1)
    e.run()
    events = [ev for b in batches for ev in b.events]
    stored = [h for ev in events if type(ev).__name__ == "BlockStored" and ev.medium == "CPU"
              for h in ev.block_hashes]
    assert stored == list(a.block_hashes[:3])


def test_blocks_cascaded_below_host_memory_are_reported_in_vllms_storage_medium(
    make: Any, tmp_path: Any
) -> None:
    from vllm.distributed.kv_events import MEDIUM_STORAGE

    e = make(tiers=[{"type": "host", "num_blocks": 16},
                    {"type": "disk", "num_blocks": 32, "path": str(tmp_path), "admission": "all"}])
    batches: list[Any] = []
    e.sched.kv_event_publisher = types.SimpleNamespace(publish=batches.append,
                                                       shutdown=lambda: None)
    a = e.add("a", prompt(50), max_tokens=1)
    e.run()
    settle(e)  # the cascade's copies report, and their blocks register below
    events = [ev for b in batches for ev in b.events]
    media = {ev.medium for ev in events if type(ev).__name__ == "BlockStored"}
    assert media == {"CPU", MEDIUM_STORAGE}
    stored = [h for ev in events if type(ev).__name__ == "BlockStored"
              and ev.medium == MEDIUM_STORAGE for h in ev.block_hashes]
    assert stored == list(a.block_hashes[:3])


def test_a_kv_cache_layout_kvbm_cannot_read_is_refused_in_one_line_and_turns_reuse_off(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from kvbm.connectors.vllm import KvbmConnector

    e = make()
    w = KvbmConnector(e.vc, _role("WORKER"), e.kcc)
    caplog.set_level(logging.ERROR, logger="kvbm.vllm")
    # 3 dims for a model with K and V: no vLLM layout kvbm knows.
    w.register_kv_caches({n: torch.zeros(64, PAGE, HEADS * HEAD) for n in LAYERS})
    said = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0]
    hs = w.get_handshake_metadata()
    assert hs is not None and hs.refused
    s = KvbmConnector(e.vc, _role("SCHEDULER"), e.kcc)
    s.set_xfer_handshake_metadata({0: hs})
    e.add("a", prompt(50))  # the engine's own connector saves it; this one must not
    req = e.sched.requests["a"]
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    assert s.scheduler_side.disabled is not None
    w.shutdown()
    e.run()


def test_workers_store_under_the_engines_physical_layout_and_keys_follow_it(make: Any) -> None:
    e = make()
    ws = e.workers[0].worker_side
    # The harness's model has no attention layers: the backend reads "unknown".
    assert ws.layout.physical == f"vllm:unknown:{[HEADS, PAGE, 2 * HEAD]}:float32"
    assert e.side.layout.physical == ws.layout.physical
    assert ws.tiers[0].ctx.namespace.layout_digest == ws.layout.digest
