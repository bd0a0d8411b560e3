"""The same transfers on a CUDA device: streams, events, pinned staging. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm import ContiguousBlocks, KvBlockManager  # noqa: E402
from kvbm.errors import ConfigError  # noqa: E402
from kvbm.layout import BlockLayout, ModelSpec  # noqa: E402
from kvbm.plugins import build_plugins  # noqa: E402
from kvbm_tiers_gpu import TransferConfig, register_kv_caches  # noqa: E402
from kvbm_tiers_gpu._cupy import cupy_available  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

L, HEADS, HD, PAGE, NB = 4, 2, 64, 16, 16
LAYOUT = BlockLayout(ModelSpec(L, HEADS, HD, "bfloat16"), PAGE)
MODEL = {"name": "tiny", "num_layers": L, "num_kv_heads": HEADS, "head_dim": HD, "dtype": "bfloat16"}


def reference() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(NB, L, 2, PAGE, HEADS, HD, generator=g).to(torch.bfloat16)


def vllm(ref: torch.Tensor) -> list[torch.Tensor]:
    return [ref[:, li].transpose(0, 1).contiguous().cuda() for li in range(L)]


def block_bytes(ref: torch.Tensor, b: int) -> np.ndarray:
    return ref[b].contiguous().view(torch.uint8).numpy().reshape(-1)


def pinned_bufs(n: int) -> list[np.ndarray]:
    t = torch.zeros(n, LAYOUT.bytes_per_block, dtype=torch.uint8, pin_memory=True)
    return list(t.numpy())


@pytest.mark.parametrize("strategy", ["gather", "direct", "per_block"])
def test_cuda_copy_out_and_in_roundtrip(strategy: str) -> None:
    ref = reference()
    cfg = TransferConfig(strategy=strategy)  # type: ignore[arg-type]
    src = register_kv_caches(vllm(ref), LAYOUT, transfer=cfg)
    assert src.on_cuda
    bufs = pinned_bufs(5)
    src.copy_out([3, 0, 9, 15, 4], bufs)
    assert np.array_equal(bufs[2], block_bytes(ref, 9))
    dst = register_kv_caches(vllm(torch.zeros_like(ref)), LAYOUT, transfer=cfg)
    dst.copy_in([1, 2, 3, 4, 5], bufs)
    got = torch.stack([dst.layer(li) for li in range(L)], 1).cpu()
    assert torch.equal(got[1:6], ref[[3, 0, 9, 15, 4]])


def test_cuda_offload_sees_the_compute_streams_writes() -> None:
    ref = reference()
    kv = vllm(torch.zeros_like(ref))
    blocks = register_kv_caches(kv, LAYOUT)
    # Queue a long kernel and the KV write on the compute stream; copy_out must follow it.
    torch.cuda._sleep(50_000_000)
    kv[0][:, 2].fill_(1.0)
    bufs = pinned_bufs(1)
    blocks.copy_out([2], bufs)
    first = torch.from_numpy(bufs[0]).view(torch.bfloat16)[: 2 * PAGE * HEADS * HD]
    assert bool((first == 1.0).all())


@pytest.mark.parametrize("strategy", ["gather", "direct", "per_block"])
def test_cuda_layerwise_waits_order_compute_after_each_layer(strategy: str) -> None:
    ref = reference()
    dst = register_kv_caches(vllm(torch.zeros_like(ref)), LAYOUT,
                             transfer=TransferConfig(strategy=strategy))  # type: ignore[arg-type]
    ids = list(range(8))
    handle = dst.onboard_layerwise(ids, [block_bytes(ref, b) for b in ids])
    for li in range(L):
        handle.wait_for_layer(li, timeout=30)
        # Runs on the current stream after the wait: it must see layer li in full.
        assert torch.equal(dst.layer(li)[ids].cpu(), ref[ids, li])
    handle.wait(timeout=30)


def test_gpu_tier_on_cuda_has_no_host_views() -> None:
    plugins = build_plugins(env={"KVBM_PLUGINS": "host,gpu"})
    tiers = [{"type": "gpu", "num_blocks": 4, "device": "cuda"},
             {"type": "host", "num_blocks": 8}]
    data = np.random.default_rng(0).integers(0, 256, (2, LAYOUT.bytes_per_block), dtype=np.uint8)
    tokens = list(range(2 * PAGE))
    with KvBlockManager.from_config({"model": MODEL, "page_size": PAGE, "tiers": tiers},
                                    plugins=plugins) as mgr:
        assert mgr.chain[0].tier.views([0]) is None
        mgr.offload(mgr.hash_tokens(tokens), ContiguousBlocks(data, mgr.layout))
        out = np.zeros_like(data)
        with mgr.match_prefix(tokens) as match:
            assert mgr.onboard(match, ContiguousBlocks(out, mgr.layout)).loaded == 2
    assert np.array_equal(out, data)


def test_engine_blocks_on_cuda_tensors_is_the_gpu_plugins_class() -> None:
    from kvbm.engine_blocks import engine_blocks
    from kvbm_tiers_gpu import DeviceBlocks

    ref = reference()
    blocks = engine_blocks(vllm(ref), LAYOUT, plugins=build_plugins(env={"KVBM_PLUGINS": "gpu"}))
    assert type(blocks) is DeviceBlocks
    bufs = pinned_bufs(1)
    blocks.copy_layer_out(1, [5], bufs)
    S = LAYOUT.bytes_per_layer
    assert np.array_equal(bufs[0][S:2 * S], block_bytes(ref, 5)[S:2 * S])


def test_cuda_vllm_033_tensors_roundtrip_with_kernel_blocks() -> None:
    ref = reference()
    ratio, n = 2, PAGE // 2
    # vLLM 0.33's logical [blocks*ratio, heads, tokens, K|V] per layer.
    kv = {f"l{li}": ref[:, li].reshape(NB, 2, ratio, n, HEADS, HD).permute(0, 2, 4, 3, 1, 5)
          .contiguous().reshape(NB * ratio, HEADS, n, 2 * HD).cuda() for li in range(L)}
    for strategy in ("gather", "direct", "per_block"):
        cfg = TransferConfig(strategy=strategy)  # type: ignore[arg-type]
        src = register_kv_caches(kv, LAYOUT, num_blocks=NB, transfer=cfg)
        bufs = pinned_bufs(3)
        src.copy_out([7, 0, 12], bufs)
        assert all(np.array_equal(b, block_bytes(ref, i)) for b, i in zip(bufs, [7, 0, 12]))
        dst = register_kv_caches({k: torch.zeros_like(t) for k, t in kv.items()}, LAYOUT,
                                 num_blocks=NB, transfer=cfg)
        dst.copy_in([1, 2, 3], bufs)
        back = pinned_bufs(3)
        dst.copy_out([1, 2, 3], back)
        assert all(np.array_equal(a, b) for a, b in zip(bufs, back)), strategy


def test_numpy_backend_on_a_cuda_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="copy_backend: value 'numpy'"):
        register_kv_caches(vllm(reference()), LAYOUT, transfer=TransferConfig(copy_backend="numpy"))


@pytest.mark.skipif(not cupy_available(), reason="CuPy is not installed")
def test_cupy_backend_copies_the_same_bytes() -> None:
    ref = reference()
    cfg = TransferConfig(strategy="per_block", copy_backend="cupy")
    src = register_kv_caches(vllm(ref), LAYOUT, transfer=cfg)
    bufs = pinned_bufs(2)
    src.copy_out([7, 1], bufs)
    assert np.array_equal(bufs[0], block_bytes(ref, 7))
