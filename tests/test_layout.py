"""Block layouts: sizes, digests, and gather/scatter between engine tensors and blocks."""

from __future__ import annotations

import numpy as np
import pytest

from kvbm import BlockLayout, ContiguousBlocks, LayoutError, ModelSpec
from kvbm.layout import LayerSeparateBlocks, aligned_empty

torch = pytest.importorskip("torch")

MODEL = ModelSpec(num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32")
LAYOUT = BlockLayout(MODEL, page_size=5)


def test_bytes_per_block_counts_layers_kv_page_and_inner_dim() -> None:
    assert LAYOUT.bytes_per_block == 3 * 2 * 5 * 8 * 4


def test_llama3_8b_block_of_16_tokens_is_2_mib() -> None:
    m = ModelSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    assert BlockLayout(m, 16).bytes_per_block == 2 * 2**20


def test_mla_has_one_outer_dim() -> None:
    m = ModelSpec(num_layers=2, num_kv_heads=1, head_dim=576, dtype="bfloat16", outer_dim=1)
    assert BlockLayout(m, 16).block_shape == (2, 1, 16, 576)


def test_layout_digest_is_stable_and_ignores_model_name() -> None:
    other = BlockLayout(ModelSpec(3, 2, 4, "float32", name="renamed"), 5)
    assert LAYOUT.digest == other.digest == BlockLayout(MODEL, 5).digest


@pytest.mark.parametrize("change", [{"dtype": "bfloat16"}, {"head_dim": 8}, {"num_layers": 4}])
def test_layout_digest_changes_with_the_byte_arrangement(change: dict[str, object]) -> None:
    m = ModelSpec(**{**MODEL.__dict__, **change})  # type: ignore[arg-type]
    assert BlockLayout(m, 5).digest != LAYOUT.digest


@pytest.mark.parametrize("bad", [{"num_layers": 0}, {"dtype": "float64"}, {"outer_dim": 3}])
def test_bad_model_spec_names_the_key(bad: dict[str, object]) -> None:
    key = next(iter(bad))
    with pytest.raises(LayoutError, match=f"model.{key}"):
        ModelSpec(**{**MODEL.__dict__, **bad})  # type: ignore[arg-type]


def vllm_caches(block_first: bool, num_blocks: int = 6) -> list[object]:
    g = torch.Generator().manual_seed(0)
    shape = [2, num_blocks, 5, 2, 4]
    if block_first:
        shape[0], shape[1] = shape[1], shape[0]
    return [torch.randn(*shape, generator=g) for _ in range(3)]


@pytest.mark.parametrize("block_first", [False, True])
def test_gather_then_scatter_restores_engine_blocks(block_first: bool) -> None:
    src = vllm_caches(block_first)
    dst = [torch.zeros_like(t) for t in src]
    bufs = [np.zeros(LAYOUT.bytes_per_block, np.uint8) for _ in range(2)]
    LayerSeparateBlocks(src, LAYOUT).copy_out([4, 1], bufs)
    LayerSeparateBlocks(dst, LAYOUT).copy_in([0, 3], bufs)
    bd = 0 if block_first else 1
    for s, d in zip(src, dst):
        assert torch.equal(d.select(bd, 0), s.select(bd, 4)) and torch.equal(d.select(bd, 3), s.select(bd, 1))


def test_gathered_block_is_laid_out_layer_major_then_kv() -> None:
    src = vllm_caches(False)
    buf = np.zeros(LAYOUT.bytes_per_block, np.uint8)
    LayerSeparateBlocks(src, LAYOUT).copy_out([2], [buf])
    block = torch.from_numpy(buf).view(torch.float32).view(3, 2, 5, 8)
    assert torch.equal(block[1, 1], src[1][1, 2].reshape(5, 8))


def test_wrong_dtype_names_expected_and_got() -> None:
    caches = [t.to(torch.float16) for t in vllm_caches(False)]
    with pytest.raises(LayoutError, match=r"expected dtype torch.float32 \(model.dtype .float32.\), got torch.float16"):
        LayerSeparateBlocks(caches, LAYOUT)


def test_wrong_shape_names_expected_and_got() -> None:
    caches = [torch.zeros(2, 6, 5, 2, 3) for _ in range(3)]
    with pytest.raises(LayoutError, match=r"expected trailing dims .* got \[5, 2, 3\]"):
        LayerSeparateBlocks(caches, LAYOUT)


def test_wrong_layer_count_is_rejected() -> None:
    with pytest.raises(LayoutError, match="expected 3 layer tensors, got 2"):
        LayerSeparateBlocks(vllm_caches(False)[:2], LAYOUT)


def test_block_id_out_of_range_is_rejected_before_copying() -> None:
    blocks = LayerSeparateBlocks(vllm_caches(False), LAYOUT)
    with pytest.raises(LayoutError, match="block id 6 is out of range"):
        blocks.copy_out([6], [np.zeros(LAYOUT.bytes_per_block, np.uint8)])


def test_contiguous_blocks_reject_wrong_row_size() -> None:
    with pytest.raises(LayoutError, match=f"expected uint8 \\[n, {LAYOUT.bytes_per_block}\\]"):
        ContiguousBlocks(np.zeros((2, 10), np.uint8), LAYOUT)


def test_aligned_buffers_start_on_a_page() -> None:
    assert aligned_empty(12345).ctypes.data % 4096 == 0
