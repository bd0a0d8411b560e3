"""Layer-wise onboarding on CPU tensors: layer i is usable before the last layer is in."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm import KvBlockManager  # noqa: E402
from kvbm.errors import LayoutError  # noqa: E402
from kvbm.layout import BlockLayout, ModelSpec  # noqa: E402
from kvbm.plugins import build_plugins  # noqa: E402
from kvbm_tiers_gpu import TransferConfig, onboard_layerwise, register_kv_caches  # noqa: E402

L, HEADS, HD, PAGE, NB = 4, 2, 8, 4, 8
MODEL = {"name": "tiny", "num_layers": L, "num_kv_heads": HEADS, "head_dim": HD, "dtype": "bfloat16"}
LAYOUT = BlockLayout(ModelSpec(L, HEADS, HD, "bfloat16"), PAGE)
TIMEOUT = 30.0


def reference() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(NB, L, 2, PAGE, HEADS, HD, generator=g).to(torch.bfloat16)


def vllm(ref: torch.Tensor) -> list[torch.Tensor]:
    return [ref[:, li].transpose(0, 1).contiguous() for li in range(L)]


def block_bytes(ref: torch.Tensor, b: int) -> np.ndarray:
    return ref[b].contiguous().view(torch.uint8).numpy().reshape(-1)


def layer_of(blocks, li: int, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return blocks.layer(li)[ids]


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("strategy", ["gather", "per_block"])
def test_layer_is_ready_before_the_last_layer_is_copied(strategy: str, backend: str) -> None:
    ref = reference()
    cfg = TransferConfig(strategy=strategy, copy_backend=backend)  # type: ignore[arg-type]
    dst = register_kv_caches(vllm(torch.zeros_like(ref)), LAYOUT, transfer=cfg)
    gate = threading.Event()
    seen: list[int] = []

    def hold_after_first_layer(li: int) -> None:
        seen.append(li)
        if li == 0:
            # The worker stops here until the test has looked at the device.
            assert gate.wait(TIMEOUT), "the test never opened the gate"

    ids, src_ids = [1, 6, 3], [0, 4, 7]
    handle = dst.onboard_layerwise(ids, [block_bytes(ref, b) for b in src_ids],
                                   on_layer=hold_after_first_layer)
    try:
        handle.wait_for_layer(0, timeout=TIMEOUT)
        assert torch.equal(layer_of(dst, 0, ids), ref[src_ids, 0])
        assert not layer_of(dst, L - 1, ids).any(), "the last layer arrived before layer 0 was released"
        assert not handle.done()
        assert handle.layers_ready == 1
    finally:
        gate.set()
    handle.wait(timeout=TIMEOUT)
    assert seen == list(range(L))
    for li in range(L):
        assert torch.equal(layer_of(dst, li, ids), ref[src_ids, li])


def test_layers_become_ready_in_layer_order() -> None:
    ref = reference()
    dst = register_kv_caches(vllm(torch.zeros_like(ref)), LAYOUT)
    order: list[int] = []
    handle = dst.onboard_layerwise(range(4), [block_bytes(ref, b) for b in range(4)],
                                   on_layer=order.append)
    for li in range(L):
        handle.wait_for_layer(li, timeout=TIMEOUT)
        assert handle.layers_ready > li
        assert torch.equal(layer_of(dst, li, [0, 1, 2, 3]), ref[:4, li])
    handle.wait(timeout=TIMEOUT)
    assert order == list(range(L))


def test_layerwise_gather_in_pieces_smaller_than_a_layer_of_the_batch() -> None:
    ref = reference()
    # Staging halves of one block-layer: every layer of 6 blocks takes 6 pieces.
    cfg = TransferConfig(strategy="gather", staging_bytes=2 * LAYOUT.bytes_per_layer)
    dst = register_kv_caches(vllm(torch.zeros_like(ref)), LAYOUT, transfer=cfg)
    ids = [7, 0, 5, 2, 6, 1]
    handle = dst.onboard_layerwise(ids, [block_bytes(ref, b) for b in range(6)])
    handle.wait(timeout=TIMEOUT)
    for li in range(L):
        assert torch.equal(layer_of(dst, li, ids), ref[:6, li])


def test_layerwise_onboard_through_manager_returns_onboard_result() -> None:
    ref = reference()
    src = register_kv_caches(vllm(ref), LAYOUT)
    dst = register_kv_caches(vllm(torch.zeros_like(ref)), LAYOUT)
    plugins = build_plugins(env={"KVBM_PLUGINS": "host,gpu"})
    cfg = {"model": MODEL, "page_size": PAGE,
           "tiers": [{"type": "host", "num_blocks": 8, "copy_threads": 1}]}
    tokens = list(range(3 * PAGE))
    with KvBlockManager.from_config(cfg, plugins=plugins) as mgr:
        mgr.offload(mgr.hash_tokens(tokens), src, indices=[5, 0, 2])
        with mgr.match_prefix(tokens) as match:
            handle = onboard_layerwise(mgr, match, dst, [7, 3, 4])
            handle.wait_for_layer(0, timeout=TIMEOUT)
            assert torch.equal(layer_of(dst, 0, [7, 3, 4]), ref[[5, 0, 2], 0])
            result = handle.wait(timeout=TIMEOUT)
    assert result.loaded == 3
    assert torch.equal(torch.stack([dst.layer(li) for li in range(L)], 1)[[7, 3, 4]], ref[[5, 0, 2]])


def test_layerwise_onboard_rejects_a_manager_of_another_layout() -> None:
    dst = register_kv_caches(vllm(torch.zeros_like(reference())), LAYOUT)
    plugins = build_plugins(env={"KVBM_PLUGINS": "host,gpu"})
    cfg = {"model": MODEL, "page_size": 2 * PAGE,
           "tiers": [{"type": "host", "num_blocks": 4, "copy_threads": 1}]}
    with (
        KvBlockManager.from_config(cfg, plugins=plugins) as mgr,
        mgr.match_prefix(list(range(16))) as match,
        pytest.raises(LayoutError, match="layout mismatch"),
    ):
        onboard_layerwise(mgr, match, dst)


def test_bad_block_id_fails_before_the_worker_starts() -> None:
    ref = reference()
    dst = register_kv_caches(vllm(torch.zeros_like(ref)), LAYOUT)
    with pytest.raises(LayoutError, match="block id 8 is out of range"):
        dst.onboard_layerwise([8], [block_bytes(ref, 0)])
    assert not torch.stack([dst.layer(li) for li in range(L)]).any()


def test_failed_copy_wakes_waiters_with_the_error() -> None:
    ref = reference()
    dst = register_kv_caches(vllm(torch.zeros_like(ref)), LAYOUT)

    def fail(li: int) -> None:
        if li == 1:
            raise RuntimeError("device lost")

    handle = dst.onboard_layerwise([0], [block_bytes(ref, 0)], on_layer=fail)
    with pytest.raises(RuntimeError, match="device lost"):
        handle.wait_for_layer(L - 1, timeout=TIMEOUT)
    with pytest.raises(RuntimeError, match="device lost"):
        handle.wait(timeout=TIMEOUT)


def test_empty_onboard_is_ready_at_once() -> None:
    dst = register_kv_caches(vllm(torch.zeros_like(reference())), LAYOUT)
    handle = dst.onboard_layerwise([], [])
    handle.wait_for_layer(L - 1, timeout=TIMEOUT)
    assert handle.wait(timeout=TIMEOUT) == 0


def test_layer_out_of_range_is_an_error() -> None:
    dst = register_kv_caches(vllm(torch.zeros_like(reference())), LAYOUT)
    handle = dst.onboard_layerwise([], [])
    with pytest.raises(LayoutError, match=r"layer 4 is out of range \[0, 4\)"):
        handle.wait_for_layer(L)
