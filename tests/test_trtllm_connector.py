"""kvbm's TensorRT-LLM connector, driven the way TRT-LLM's executor drives a connector, on CPU.

TensorRT-LLM needs CUDA and is not installed here, so ``Engine`` below stands in for
the parts of it that call the connector, in their order within one iteration of
``PyExecutor._executor_loop`` and ``KvCacheConnectorManager``:

1. scheduling: for each new request ``get_num_new_matched_tokens(request, 0)``, blocks
   allocated for the whole request, ``update_state_after_alloc(request, block_ids)``,
   the context position advanced by the promised tokens;
2. ``SchedulerOutput`` as ``KvCacheConnectorSchedulerOutputManager`` builds it
   (deltas of tokens and block ids; ``computed_position`` less the tokens promised in
   this iteration), ``build_connector_meta`` on the leader, the metadata pickled (TRT-LLM
   broadcasts it), ``bind_connector_meta`` and ``start_load_kv`` on the worker;
3. the forward pass, layer by layer: ``wait_for_layer_load(i)``, then the stand-in
   model's attention reads the KV of every position before the scheduled ones (checked
   against the known values: what a real model would attend over), writes the KV of
   the scheduled tokens into the pool, then ``save_kv_layer(i)``; then ``wait_for_save``;
4. sampling, ``request_finished`` for finished requests, ``get_finished``.

The pool is a real CPU tensor in TRT-LLM's layout, ``[blocks, layers, K|V, heads ×
tokens × head_dim]`` (the TRTLLM attention backend's order inside a block); the stand-in
model writes KV values that are a known function of (layer, token, position, K|V, head,
channel). Freed blocks are scrubbed, so stale KV never passes for loaded KV. The chain
is a host tier and a disk tier of real O_DIRECT files in ``tmp_path``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from kvbm.plugins import build_plugins  # noqa: E402
from kvbm_trtllm import api  # noqa: E402
from kvbm_trtllm.connector import (  # noqa: E402
    DynamoKVBMConnectorLeader,
    DynamoKVBMConnectorWorker,
    KvbmLoadError,
)

PAGE = 16
LAYERS = 2
HEADS = 2
HEAD = 8
NUM_BLOCKS = 48
SCRUB = -1.0


def kv_value(layer: int, tokens: Any, pos: Any) -> Any:
    """The stand-in model's KV: ``[n, K|V, heads, channel]``, exact integers in float32."""
    kv = torch.arange(2).view(1, 2, 1, 1)
    h = torch.arange(HEADS).view(1, 1, HEADS, 1)
    c = torch.arange(HEAD).view(1, 1, 1, HEAD)
    base = (tokens * 7 + pos * 13 + layer * 101).view(-1, 1, 1, 1)
    return ((base + kv * 29 + h * 17 + c) % 4093).to(torch.float32)


def prompt(n: int, seed: int = 1) -> list[int]:
    return [(seed * 131 + i * 7) % 997 + 1 for i in range(n)]


class Request:
    """The parts of TRT-LLM's ``LlmRequest`` the connector and the loop read."""

    def __init__(self, request_id: int, tokens: list[int], max_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_len = len(tokens)
        self.tokens = list(tokens)
        self.max_tokens = max_tokens
        self.is_generation_only_request = False
        self.lora_task_id = None
        self.multimodal_positions = None
        self.cache_salt = None
        self.context_current_position = 0
        self.block_ids: list[int] = []
        self.generated = 0
        self.computed: list[int] = []  # positions whose KV the engine computed
        self.sent = (0, 0)  # tokens and blocks reported in scheduler outputs so far

    def get_tokens(self, beam: int) -> list[int]:
        return list(self.tokens)

    @property
    def in_context(self) -> bool:
        return self.context_current_position < self.prompt_len


def llm_args(model_dir: Path, *, rank: int = 0, tp: int = 1, backend: str = "TRTLLM") -> Any:
    """The parts of ``TorchLlmArgs`` the connector reads."""
    mapping = types.SimpleNamespace(rank=rank, tp_rank=rank, tp_size=tp, world_size=tp,
                                    pp_size=1, cp_size=1)
    return types.SimpleNamespace(
        model=str(model_dir), attn_backend=backend,
        kv_cache_config=types.SimpleNamespace(tokens_per_block=PAGE, enable_partial_reuse=False),
        parallel_config=types.SimpleNamespace(to_mapping=lambda: mapping))


class Engine:
    """TRT-LLM's executor loop and connector manager around kvbm's leader and worker."""

    def __init__(self, args: Any, *, dtype: Any = None) -> None:
        self.pool = torch.full((NUM_BLOCKS, LAYERS, 2, PAGE * HEADS * HEAD), SCRUB,
                               dtype=dtype or torch.float32)
        # TRT-LLM builds both halves concurrently, then registers the pool on every
        # rank and waits for the leader's initialization.
        self.leader = DynamoKVBMConnectorLeader(args)
        self.worker = DynamoKVBMConnectorWorker(args)
        self.worker.register_kv_caches(self.pool)
        self.leader.wait_for_initialization()
        self.free = list(range(int(self.pool.shape[0])))
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.matched: dict[int, int] = {}  # request -> tokens kvbm promised
        self.bad_reads: list[tuple[int, int, int]] = []  # (request, layer, block index)
        self.errors: list[KvbmLoadError] = []
        self.failed: list[int] = []
        self.outputs: list[Any] = []  # every SchedulerOutput, as built
        #: Tokens the runtime honours of an offer (KVCacheManagerV2 may take less and
        #: says so with cancel_load); None: all.
        self.honour: int | None = None
        self._next_id = 1

    @property
    def blocks(self) -> Any:
        """The pool as the TRTLLM backend reads it: ``[blocks, layers, K|V, heads, page, hd]``."""
        return self.pool.view(-1, LAYERS, 2, HEADS, PAGE, HEAD)

    def add(self, tokens: list[int], max_tokens: int = 1) -> Request:
        req = Request(self._next_id, tokens, max_tokens)
        self._next_id += 1
        self.waiting.append(req)
        return req

    # -- one iteration --------------------------------------------------------------------
    def step(self) -> None:
        promised: dict[int, int] = {}
        for req in self.waiting:
            n, load_async = self.leader.get_num_new_matched_tokens(req, 0)
            assert not load_async, "kvbm's TensorRT-LLM loads are layer-wise"
            if self.honour is not None and self.honour < n:
                self.leader.cancel_load(req, self.honour, n)
                n = self.honour
            need = -(-(req.prompt_len + req.max_tokens) // PAGE)
            req.block_ids = [self.free.pop(0) for _ in range(need)]
            self.leader.update_state_after_alloc(req, list(req.block_ids))
            req.context_current_position = n
            promised[req.request_id] = self.matched[req.request_id] = n
            self.running.append(req)
        self.waiting = []
        if self.running:
            self._forward(self._scheduler_output(promised))
        self.worker.get_finished([], [])

    def _scheduler_output(self, promised: dict[int, int]) -> Any:
        so = api.SchedulerOutput()
        for req in self.running:
            tokens = req.get_tokens(0)
            t0, b0 = req.sent
            if req.in_context:
                computed = req.context_current_position
                sched = req.prompt_len - computed
            else:
                computed, sched = len(tokens) - 1, 1
            # TRT-LLM leaves the promised tokens out of the output of the iteration
            # that promised them.
            computed -= promised.get(req.request_id, 0)
            rd = api.RequestData(req.request_id, tokens[t0:], req.block_ids[b0:], computed, sched)
            (so.new_requests if req.sent == (0, 0) else so.cached_requests).append(rd)
            req.sent = (len(tokens), len(req.block_ids))
        self.outputs.append(so)
        return so

    def _forward(self, so: Any) -> None:
        meta = pickle.loads(pickle.dumps(self.leader.build_connector_meta(so)))
        self.worker.bind_connector_meta(meta)
        self.worker.start_load_kv(None)
        try:
            for layer in range(LAYERS):
                self.worker.wait_for_layer_load(layer, None)
                for req in self.running:
                    start = req.context_current_position if req.in_context else len(req.tokens) - 1
                    end = req.prompt_len if req.in_context else start + 1
                    self._attend(req, layer, start)
                    self._write(req, layer, start, end)
                self.worker.save_kv_layer(layer, None)
            self.worker.wait_for_save(None)
        except KvbmLoadError as e:
            # TRT-LLM's _forward_step: the error fails the step's requests.
            self.errors.append(e)
            for req in list(self.running):
                self.failed.append(req.request_id)
                self._finish(req)
            return
        for req in list(self.running):
            if req.in_context:
                req.computed.extend(range(req.context_current_position, req.prompt_len))
                req.context_current_position = req.prompt_len
            else:
                req.computed.append(len(req.tokens) - 1)
            req.tokens.append(500 + len(req.tokens) % 97)
            req.generated += 1
            if req.generated >= req.max_tokens:
                self._finish(req)

    def _positions(self, req: Request, start: int, end: int) -> tuple[Any, Any, Any]:
        pos = torch.arange(start, end)
        blocks = torch.tensor([req.block_ids[p // PAGE] for p in range(start, end)],
                              dtype=torch.long)
        return pos, blocks, pos % PAGE

    def _attend(self, req: Request, layer: int, end: int) -> None:
        """Read the KV attention of ``layer`` reads: every position before ``end``."""
        if end == 0:
            return
        pos, blocks, off = self._positions(req, 0, end)
        # blocks[b, layer, kv, head, offset, :] for every position: [n, K|V, heads, hd]
        got = self.blocks[blocks, layer][torch.arange(end), :, :, off]
        want = kv_value(layer, torch.tensor(req.tokens[:end]), pos).to(got.dtype)
        wrong = (got != want).flatten(1).any(dim=1)
        for b in sorted({int(p) // PAGE for p in pos[wrong]}):
            self.bad_reads.append((req.request_id, layer, b))

    def _write(self, req: Request, layer: int, start: int, end: int) -> None:
        pos, blocks, off = self._positions(req, start, end)
        value = kv_value(layer, torch.tensor(req.tokens[start:end]), pos)
        for i in range(end - start):
            self.blocks[blocks[i], layer, :, :, off[i]] = value[i]

    def _finish(self, req: Request) -> None:
        self.running.remove(req)
        self.leader.request_finished(req, list(req.block_ids))
        self.pool[req.block_ids] = SCRUB
        self.free.extend(req.block_ids)

    # -- helpers for tests ------------------------------------------------------------------
    def run(self) -> None:
        """Step until no request is left."""
        while self.waiting or self.running:
            self.step()

    def settle(self) -> None:
        """Let background copies finish and their reports reach the leader.

        TRT-LLM sends metadata only in iterations with a batch: these stand for
        iterations of other requests, which carry kvbm's cascade copies along.
        """
        for _ in range(4):
            self.worker.side.drain(10)
            self.worker.bind_connector_meta(
                self.leader.build_connector_meta(api.SchedulerOutput()))
            self.worker.start_load_kv(None)
            self.worker.wait_for_save(None)
            self.worker.get_finished([], [])

    def serve(self, tokens: list[int], max_tokens: int = 1) -> Request:
        """Run one request to the end, then settle."""
        req = self.add(tokens, max_tokens)
        self.run()
        self.settle()
        return req

    def hashes(self, tokens: list[int]) -> list[bytes]:
        return list(self.leader.side._hasher(None, None).hash_tokens(tokens))

    def tier_of(self, key: bytes) -> list[str]:
        planner = self.leader.side.planner
        assert planner is not None
        return [ts.name for ts in planner.tiers if key in ts.registry]

    def close(self) -> None:
        self.worker.close()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "num_attention_heads": 4, "num_key_value_heads": HEADS, "head_dim": HEAD,
        "num_hidden_layers": LAYERS, "torch_dtype": "float32"}))
    return d


@pytest.fixture
def make(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
         ) -> Iterator[Callable[..., Engine]]:
    """An engine over a host tier and an O_DIRECT disk tier in ``tmp_path`` (``disk=None``:
    host only)."""
    engines: list[Engine] = []

    def build(host: int = 16, disk: int | None = 64, **kw: Any) -> Engine:
        tiers: list[dict[str, Any]] = [{"type": "host", "num_blocks": host}]
        if disk:
            tiers.append({"type": "disk", "num_blocks": disk, "path": str(tmp_path / "disk"),
                          "admission": "all"})
        cfg = tmp_path / "kvbm.yaml"
        cfg.write_text(json.dumps({"tiers": tiers}))
        monkeypatch.setenv("KVBM_CONFIG", str(cfg))
        e = Engine(llm_args(model_dir, **{k: v for k, v in kw.items() if k != "dtype"}),
                   dtype=kw.get("dtype"))
        engines.append(e)
        return e

    yield build
    for e in engines:
        e.close()


def _failing_reads(tier: Any, bad_keys: set[bytes]) -> None:
    """Make a real tier's reads of some blocks fail, as a bad checksum would.

    Reads go through the tier's own ``read`` (a memory tier stops offering views), and
    blocks whose key is in ``bad_keys`` are reported unreadable.
    """
    tier.bad_keys = set(bad_keys)
    if "read" in tier.__dict__:
        return
    real_read = type(tier).read.__get__(tier)

    def views(slots: Any) -> None:
        return None

    def read(slots: Any, keys: Any, dst: Any) -> list[bool]:
        ok = real_read(slots, keys, dst)
        return [g and bytes(k) not in tier.bad_keys for g, k in zip(ok, keys)]

    tier.views = views
    tier.read = read


# --- hits and misses ---------------------------------------------------------------


def test_repeated_prompt_loads_its_blocks_layer_by_layer_and_computes_only_the_rest(
        make: Callable[..., Engine]) -> None:
    e = make()
    e.serve(prompt(64))
    b = e.serve(prompt(64), max_tokens=3)
    # Three of four blocks: TRT-LLM must compute at least one prompt token itself.
    assert e.matched[b.request_id] == 48
    assert b.computed == list(range(48, 64)) + [64, 65]
    assert e.bad_reads == []
    assert e.leader.side.loaded_blocks == 3 and e.leader.side.failed_blocks == 0


def test_unseen_prompt_loads_nothing_and_computes_everything(make: Callable[..., Engine]) -> None:
    e = make()
    e.serve(prompt(64))
    b = e.serve(prompt(64, seed=2))
    assert e.matched[b.request_id] == 0
    assert b.computed == list(range(64))
    assert e.leader.side.loaded_blocks == 0


def test_prompt_sharing_a_prefix_stops_at_the_first_differing_block(
        make: Callable[..., Engine]) -> None:
    e = make()
    e.serve(prompt(64))
    other = prompt(64)[:40] + prompt(24, seed=3)  # differs inside block 2
    b = e.serve(other)
    assert e.matched[b.request_id] == 32
    assert b.computed == list(range(32, 64))
    assert e.bad_reads == []


def test_blocks_evicted_from_host_are_loaded_back_from_disk(
        make: Callable[..., Engine], tmp_path: Path) -> None:
    e = make(host=4)
    e.serve(prompt(64))
    e.serve(prompt(64, seed=2))  # its four blocks push the first prompt's out of host memory
    keys = e.hashes(prompt(64))
    assert [e.tier_of(k) for k in keys[:3]] == [["disk"]] * 3
    assert e.worker.side.tiers[1].stats()["o_direct"] is True
    assert any((tmp_path / "disk").rglob("*")), "the disk tier keeps its blocks in files there"
    b = e.serve(prompt(64))
    assert e.matched[b.request_id] == 48
    assert b.computed == list(range(48, 64))
    assert e.bad_reads == []
    # Read from disk, they were promoted back into host memory.
    assert all("host" in e.tier_of(k) for k in keys[:3])


def test_a_restarted_engine_loads_blocks_its_disk_tier_kept(
        make: Callable[..., Engine]) -> None:
    e = make(host=4)
    e.serve(prompt(64))
    e.serve(prompt(64, seed=2))
    e.close()
    again = make(host=4)
    assert again.leader.side.restored_blocks >= 3
    b = again.serve(prompt(64))
    assert again.matched[b.request_id] == 48
    assert again.bad_reads == []


def test_chunked_generation_saves_blocks_completed_by_generated_tokens(
        make: Callable[..., Engine]) -> None:
    e = make()
    a = e.serve(prompt(40), max_tokens=30)  # 40 + 29 tokens with KV: four full blocks
    b = e.serve(a.tokens[:69])
    assert e.matched[b.request_id] == 64
    assert b.computed == list(range(64, 69))
    assert e.bad_reads == []


def test_an_offer_the_runtime_takes_only_part_of_loads_that_part(
        make: Callable[..., Engine]) -> None:
    e = make()
    e.serve(prompt(64))
    e.honour = 16
    b = e.serve(prompt(64))
    assert b.computed == list(range(16, 64)) and e.bad_reads == []
    assert e.leader.side.loaded_blocks == 1
    assert e.leader.side.planner is not None and e.leader.side.planner.pins() == 0


# --- failures ----------------------------------------------------------------------


def test_a_block_whose_load_fails_is_reported_and_recomputed_when_the_prompt_returns(
        make: Callable[..., Engine]) -> None:
    e = make(disk=None)
    e.serve(prompt(64))
    keys = e.hashes(prompt(64))
    _failing_reads(e.worker.side.tiers[0], {keys[1]})
    b = e.serve(prompt(64))
    # The step failed rather than run on KV that never arrived, naming the block.
    assert e.failed == [b.request_id]
    (err,) = e.errors
    assert err.failed == {str(b.request_id): [b.block_ids[1]]}
    assert e.leader.side.failed_blocks == 1 and e.leader.side.loaded_blocks == 2
    assert e.tier_of(keys[1]) == []
    # The prompt again: kvbm no longer offers the unreadable block; the engine computes
    # from it, and every layer it attends over is right.
    _failing_reads(e.worker.side.tiers[0], set())
    e.bad_reads.clear()
    c = e.serve(prompt(64))
    assert e.matched[c.request_id] == 16
    assert c.computed == list(range(16, 64))
    assert e.bad_reads == []
    # It saved what it recomputed: the next request loads all three blocks again.
    d = e.serve(prompt(64))
    assert e.matched[d.request_id] == 48 and e.bad_reads == []


def test_a_block_whose_host_copy_fails_is_loaded_from_disk_when_the_prompt_returns(
        make: Callable[..., Engine]) -> None:
    e = make()
    e.serve(prompt(64))
    keys = e.hashes(prompt(64))
    assert e.tier_of(keys[1]) == ["host", "disk"]
    _failing_reads(e.worker.side.tiers[0], {keys[1]})
    b = e.serve(prompt(64))
    assert e.failed == [b.request_id]
    assert e.tier_of(keys[1]) == ["disk"]
    e.bad_reads.clear()
    c = e.serve(prompt(64))
    assert e.matched[c.request_id] == 48 and c.computed == list(range(48, 64))
    assert e.bad_reads == []


def test_blocks_computed_on_top_of_a_failed_load_are_never_stored(
        make: Callable[..., Engine]) -> None:
    e = make()
    e.serve(prompt(64))
    keys = e.hashes(prompt(64))
    _failing_reads(e.worker.side.tiers[0], {keys[0]})
    longer = prompt(64) + prompt(32, seed=5)
    e.serve(longer)
    assert e.failed
    assert [e.tier_of(k) for k in e.hashes(longer)[4:]] == [[], []]


def test_a_pool_kvbm_cannot_read_turns_reuse_off_and_the_engine_runs(
        make: Callable[..., Engine], caplog: pytest.LogCaptureFixture) -> None:
    e = make(dtype=torch.float64)
    assert "dtype torch.float64 is not supported" in (e.leader.side.disabled or "")
    e.serve(prompt(64))
    b = e.serve(prompt(64))
    assert e.matched[b.request_id] == 0 and b.computed == list(range(64))


def test_finished_requests_leave_no_pins_and_no_pending_work(make: Callable[..., Engine]) -> None:
    e = make(host=4)
    for seed in (1, 2, 1, 3):
        e.serve(prompt(64, seed=seed), max_tokens=2)
    planner = e.leader.side.planner
    assert planner is not None
    assert planner.pins() == 0 and planner.num_pending == 0 and e.leader.side.reqs == {}


def test_the_kv_check_catches_a_load_that_writes_the_wrong_block(
        make: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a load into the wrong engine block is seen by the stand-in model."""
    e = make()
    e.serve(prompt(64))
    real = e.leader.side.planner.plan_load  # type: ignore[union-attr]

    def shifted(m: Any, dst: Any, **kw: Any) -> Any:
        return real(m, [d + 1 for d in dst], **kw)

    monkeypatch.setattr(e.leader.side.planner, "plan_load", shifted)
    e.serve(prompt(64))
    assert e.bad_reads


# --- tensor parallelism ------------------------------------------------------------


class ThreadCollective:
    """TRT-LLM's MPI allgather for ranks that are threads of one process."""

    def __init__(self, barrier: threading.Barrier, slots: list[Any], rank: int) -> None:
        self.barrier, self.slots, self.rank, self.size = barrier, slots, rank, len(slots)

    def allgather(self, obj: Any) -> list[Any]:
        self.slots[self.rank] = obj
        self.barrier.wait(10)
        out = list(self.slots)
        self.barrier.wait(10)
        return out


def rank_kv(rank: int, n: int) -> Any:
    """Distinct contents for ``n`` blocks of rank ``rank``'s shard."""
    per_rank = PAGE * (HEADS // 2) * HEAD
    return torch.arange(n * LAYERS * 2 * per_rank, dtype=torch.float32).view(
        n, LAYERS, 2, per_rank) % 1021 + 2000 * (rank + 1)


def test_tp2_block_is_matchable_only_once_both_ranks_saved_it_and_each_gets_its_shard_back(
        tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "kvbm.yaml"
    cfg.write_text(json.dumps({"tiers": [{"type": "host", "num_blocks": 16}]}))
    monkeypatch.setenv("KVBM_CONFIG", str(cfg))
    # Two ranks of one engine: their own pool (half the heads each), one llm_args each
    # as in their own processes; the leader lives with rank 0.
    args = [llm_args(model_dir, rank=r, tp=2) for r in range(2)]
    barrier, slots = threading.Barrier(2), [None, None]
    workers = [DynamoKVBMConnectorWorker(a, collective=ThreadCollective(barrier, slots, r))
               for r, a in enumerate(args)]
    leader = DynamoKVBMConnectorLeader(args[0])
    pools = [torch.zeros(12, LAYERS, 2, PAGE * (HEADS // 2) * HEAD) for _ in range(2)]

    def on_all(fn: Callable[[int], Any]) -> None:
        threads = [threading.Thread(target=fn, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)

    def run_step(so: Any) -> None:
        meta = pickle.loads(pickle.dumps(leader.build_connector_meta(so)))

        def rank(r: int) -> None:
            w = workers[r]
            w.bind_connector_meta(meta)
            w.start_load_kv(None)
            for layer in range(LAYERS):
                w.wait_for_layer_load(layer, None)
                w.save_kv_layer(layer, None)
            w.wait_for_save(None)
            w.get_finished([], [])
        on_all(rank)

    def serve(rid: int, ids: list[int]) -> int:
        req = Request(rid, prompt(33), 1)
        n, _ = leader.get_num_new_matched_tokens(req, 0)
        leader.update_state_after_alloc(req, ids)
        if n == 0:
            for r in range(2):  # the forward pass computes both blocks on each rank
                pools[r][ids[:2]] = rank_kv(r, 2)
        run_step(api.SchedulerOutput(new_requests=[
            api.RequestData(rid, prompt(33), ids, 0, 33 - n)]))
        leader.request_finished(req, ids)
        return n

    try:
        on_all(lambda r: workers[r].register_kv_caches(pools[r]))
        leader.wait_for_initialization()

        def broken(*a: Any, **k: Any) -> None:
            raise RuntimeError("rank 1 cannot read its pool")
        engine1 = workers[1].side.engine
        real = engine1.copy_layer_out
        engine1.copy_layer_out = broken
        assert serve(1, [0, 1, 2]) == 0
        engine1.copy_layer_out = real
        # Rank 1 never wrote them: the blocks are not matchable, so they are saved again.
        assert serve(2, [3, 4, 5]) == 0
        assert serve(3, [6, 7, 8]) == 32
        for r in range(2):
            assert torch.equal(pools[r][6:8], rank_kv(r, 2)), f"rank {r} got another shard"
    finally:
        for w in workers:
            w.close()


# --- module paths, the interface, the plugin -----------------------------------------


def test_both_module_paths_import_without_tensorrt_llm_and_name_the_same_classes() -> None:
    code = ("import importlib, sys\n"
            "for path in ('kvbm.trtllm_integration.connector', 'kvbm_trtllm.connector'):\n"
            "    m = importlib.import_module(path)\n"
            "    print(path, m.DynamoKVBMConnectorLeader.__module__,"
            " m.DynamoKVBMConnectorWorker.__module__)\n"
            "print('trt', 'tensorrt_llm' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "kvbm.trtllm_integration.connector kvbm_trtllm.connector kvbm_trtllm.connector",
        "kvbm_trtllm.connector kvbm_trtllm.connector kvbm_trtllm.connector",
        "trt False",
    ]


def test_trtllm_resolves_dynamos_configuration_to_kvbms_classes() -> None:
    # What TRT-LLM's py_executor_creator does with kv_connector_config (and with its
    # "kvbm" preset, which names the same three strings).
    config = {"connector_module": "kvbm.trtllm_integration.connector",
              "connector_scheduler_class": "DynamoKVBMConnectorLeader",
              "connector_worker_class": "DynamoKVBMConnectorWorker"}
    module = importlib.import_module(config["connector_module"])
    leader_cls = getattr(module, config["connector_scheduler_class"])
    worker_cls = getattr(module, config["connector_worker_class"])
    assert issubclass(leader_cls, api.KvCacheConnectorScheduler)
    assert issubclass(worker_cls, api.KvCacheConnectorWorker)
    assert not inspect.isabstract(leader_cls) and not inspect.isabstract(worker_cls)


@pytest.mark.parametrize("cls,base", [
    (DynamoKVBMConnectorLeader, api.KvCacheConnectorScheduler),
    (DynamoKVBMConnectorWorker, api.KvCacheConnectorWorker),
])
def test_connector_methods_take_trtllms_arguments(cls: type, base: type) -> None:
    for name, member in inspect.getmembers(base, inspect.isfunction):
        if name.startswith("_") or name not in cls.__dict__:
            continue
        want = list(inspect.signature(member).parameters)
        got = list(inspect.signature(getattr(cls, name)).parameters)
        assert got[:len(want)] == want, f"{cls.__name__}.{name}{got} != {want}"


def test_plugin_registers_the_trtllm_connector() -> None:
    entry = build_plugins().connectors.get("trtllm")
    assert entry.factory == "kvbm_trtllm.connector:DynamoKVBMConnectorLeader"
    assert entry.plugin.distribution == "kvbm"


def test_dynamos_environment_configures_the_chain(
        tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "8")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "32")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path / "dyn"))
    e = Engine(llm_args(model_dir))
    try:
        planner = e.leader.side.planner
        assert planner is not None
        assert [(ts.cls.__name__, ts.registry.capacity) for ts in planner.tiers] == [
            ("HostTier", 8), ("DiskTier", 32)]
        e.serve(prompt(64))
        b = e.serve(prompt(64))
        assert e.matched[b.request_id] == 48 and e.bad_reads == []
    finally:
        e.close()
