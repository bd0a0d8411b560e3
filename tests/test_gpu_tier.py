"""The gpu tier as the first link of a chain, on CPU memory when CUDA is absent."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm import ContiguousBlocks, KvBlockManager  # noqa: E402
from kvbm.errors import ConfigError  # noqa: E402
from kvbm.plugins import build_plugins  # noqa: E402

MODEL = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "bfloat16"}
PAGE = 4
BLOCK_BYTES = 2 * 2 * PAGE * 2 * 8 * 2


def manager(gpu: dict | None = None, host_blocks: int = 8) -> KvBlockManager:
    plugins = build_plugins(env={"KVBM_PLUGINS": "host,gpu"})
    tiers = [{"type": "gpu", "num_blocks": 4, "device": "cpu", **(gpu or {})},
             {"type": "host", "num_blocks": host_blocks, "copy_threads": 1}]
    return KvBlockManager.from_config({"model": MODEL, "page_size": PAGE, "tiers": tiers},
                                      plugins=plugins)


def blocks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, BLOCK_BYTES), dtype=np.uint8)


def test_gpu_tier_is_registered_with_its_extra() -> None:
    entry = build_plugins(env={"KVBM_PLUGINS": "gpu"}).tiers.get("gpu")
    assert entry.extra == "gpu" and entry.requires == ("torch",)
    assert entry.factory == "kvbm_tiers_gpu.tier:GpuTier"


def test_engine_layouts_are_registered() -> None:
    reg = build_plugins(env={"KVBM_PLUGINS": "gpu"}).layouts
    assert {"vllm", "trtllm", "mla"} <= set(reg.names())


def test_gpu_tier_declares_the_gpu_medium() -> None:
    entry = build_plugins(env={"KVBM_PLUGINS": "gpu"}).tiers.get("gpu")
    assert entry.load().medium == "GPU"


def test_gpu_tier_on_cpu_hands_out_numpy_views() -> None:
    with manager() as mgr:
        tier = mgr.chain[0].tier
        views = tier.views([0, 3])
        assert views is not None and views[1].shape == (BLOCK_BYTES,) and views[1].dtype == np.uint8
        assert tier.stats()["device"] == "cpu"


@pytest.mark.parametrize("strategy", ["gather", "per_block"])
def test_chain_with_gpu_tier_on_top_roundtrips(strategy: str) -> None:
    data = blocks(3)
    tokens = list(range(3 * PAGE))
    with manager({"strategy": strategy}) as mgr:
        mgr.offload(mgr.hash_tokens(tokens), ContiguousBlocks(data, mgr.layout))
        mgr.flush()
        out = np.zeros_like(data)
        with mgr.match_prefix(tokens) as match:
            assert match.tiers == ["gpu"] * 3
            assert mgr.onboard(match, ContiguousBlocks(out, mgr.layout)).loaded == 3
        assert mgr.stats()["tiers"]["host"]["used_blocks"] == 3
    assert np.array_equal(out, data)


def test_gpu_tier_read_and_write_move_whole_blocks() -> None:
    with manager() as mgr:
        tier = mgr.chain[0].tier
        data = blocks(2, seed=3)
        assert tier.write([2, 0], [b"a" * 16, b"b" * 16], list(data)) == [True, True]
        out = np.zeros_like(data)
        assert tier.read([2, 0], [b"a" * 16, b"b" * 16], list(out)) == [True, True]
    assert np.array_equal(out, data)


def test_device_cuda_without_cuda_is_a_config_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    with pytest.raises(ConfigError, match="needs CUDA, which is not available"):
        manager({"device": "cuda"})


def test_cupy_backend_on_cpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="copy_backend: value 'cupy'.*CUDA device"):
        manager({"copy_backend": "cupy"})


def test_unknown_strategy_names_the_tier_and_key() -> None:
    with pytest.raises(ConfigError, match="tier 'gpu'.*strategy"):
        manager({"strategy": "fastest"})
