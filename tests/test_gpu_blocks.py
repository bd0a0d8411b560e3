"""DeviceBlocks on CPU tensors: engine registration, both strategies, roundtrips, bad input."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm import KvBlockManager  # noqa: E402
from kvbm.errors import LayoutError  # noqa: E402
from kvbm.layout import BlockLayout, ModelSpec  # noqa: E402
from kvbm.plugins import build_plugins  # noqa: E402
from kvbm_tiers_gpu import DeviceBlocks, TransferConfig, register_kv_caches  # noqa: E402

L, HEADS, HD, PAGE, NB = 4, 2, 8, 4, 12
MODEL = {"name": "tiny", "num_layers": L, "num_kv_heads": HEADS, "head_dim": HD, "dtype": "bfloat16"}
LAYOUT = BlockLayout(ModelSpec(L, HEADS, HD, "bfloat16"), PAGE)
MLA_LAYOUT = BlockLayout(ModelSpec(L, 1, HD, "bfloat16", outer_dim=1), PAGE)
GATHER = TransferConfig(strategy="gather")
PER_BLOCK = TransferConfig(strategy="per_block")
# Every strategy with each copy backend CPU tensors have: torch's copies (the CUDA code
# path) and numpy's (the CPU default).
TRANSFERS = {
    f"{st}-{be}": TransferConfig(strategy=st, copy_backend=be)  # type: ignore[arg-type]
    for st in ("gather", "per_block") for be in ("torch", "numpy")
}
# direct's copies are torch's on every device (the backend picks per_block's copies only).
TRANSFERS["direct"] = TransferConfig(strategy="direct")


def reference(outer: int = 2, heads: int = HEADS, nb: int = NB, seed: int = 0) -> torch.Tensor:
    """The logical KV: ``[blocks, layers, outer, page, heads, head_dim]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nb, L, outer, PAGE, heads, HD, generator=g).to(torch.bfloat16)


def block_bytes(ref: torch.Tensor, b: int) -> np.ndarray:
    return ref[b].contiguous().view(torch.uint8).numpy().reshape(-1)


# Each engine arrangement of the same logical KV, and how to read it back as the reference.
def vllm_kv_first(ref: torch.Tensor) -> list[torch.Tensor]:
    return [ref[:, li].transpose(0, 1).contiguous() for li in range(L)]


def vllm_blocks_first(ref: torch.Tensor) -> list[torch.Tensor]:
    return [ref[:, li].contiguous() for li in range(L)]


def vllm_hnd_strides(ref: torch.Tensor) -> list[torch.Tensor]:
    # Storage [blocks, 2, heads, page, hd] seen as [blocks, 2, page, heads, hd], as vLLM's
    # HND backends hand it out.
    return [ref[:, li].permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4) for li in range(L)]


def vllm_cpu_backend(ref: torch.Tensor) -> list[torch.Tensor]:
    # vLLM's CPU attention: [blocks, heads, page, 2*hd] over memory [blocks, heads, 2, page, hd].
    return [ref[:, li].permute(0, 3, 1, 2, 4).contiguous().reshape(NB, HEADS, PAGE, 2 * HD)
            for li in range(L)]


def vllm_bhnc(ref: torch.Tensor, ratio: int = 1, nhd: bool = False) -> list[torch.Tensor]:
    # vLLM 0.33: logical [blocks*ratio, heads, tokens, K|V] per layer; with nhd, the
    # storage is [blocks*ratio, tokens, heads, K|V] (a stride order vLLM's layouts allow).
    n = PAGE // ratio
    out = []
    for li in range(L):
        t = ref[:, li].reshape(NB, 2, ratio, n, HEADS, HD)  # [nb, kv, r, n, h, hd]
        if nhd:
            t = t.permute(0, 2, 3, 4, 1, 5).contiguous().reshape(NB * ratio, n, HEADS, 2 * HD)
            out.append(t.transpose(1, 2))
        else:
            out.append(t.permute(0, 2, 4, 3, 1, 5).contiguous().reshape(NB * ratio, HEADS, n, 2 * HD))
    return out


def trtllm_nhd(ref: torch.Tensor) -> torch.Tensor:
    return ref.contiguous().reshape(NB, L, 2, -1)


def trtllm_hnd(ref: torch.Tensor) -> torch.Tensor:
    return ref.permute(0, 1, 2, 4, 3, 5).contiguous().reshape(NB, L, 2, -1)


ENGINES = {
    "vllm_kv_first": (vllm_kv_first, {}),
    "vllm_blocks_first": (vllm_blocks_first, {}),
    "vllm_hnd_strides": (vllm_hnd_strides, {}),
    "vllm_cpu_backend": (vllm_cpu_backend, {"form": "vllm-cpu"}),
    "vllm_bhnc": (vllm_bhnc, {}),
    "vllm_bhnc_ratio2": (lambda ref: vllm_bhnc(ref, ratio=2), {"num_blocks": NB}),
    "vllm_bhnc_ratio2_nhd": (lambda ref: vllm_bhnc(ref, ratio=2, nhd=True), {"num_blocks": NB}),
    "trtllm_nhd": (trtllm_nhd, {}),
    "trtllm_hnd": (trtllm_hnd, {"kv_layout": "HND"}),
}


def logical(blocks: DeviceBlocks) -> torch.Tensor:
    """The registered tensors read back as ``[blocks, layers, outer, page, heads, hd]``."""
    # vLLM 0.33's kernel blocks may keep [ratio, tokens] apart: merge them (a copy).
    return torch.stack([blocks.layer(li).flatten(2, -3) for li in range(L)], dim=1)


def make_manager(num_blocks: int = 16) -> KvBlockManager:
    plugins = build_plugins(env={"KVBM_PLUGINS": "host,gpu"})
    cfg = {"model": MODEL, "page_size": PAGE,
           "tiers": [{"type": "host", "num_blocks": num_blocks, "copy_threads": 1}]}
    return KvBlockManager.from_config(cfg, plugins=plugins)


def host_bufs(n: int, layout: BlockLayout = LAYOUT) -> list[np.ndarray]:
    return list(np.zeros((n, layout.bytes_per_block), dtype=np.uint8))


# -- registration --------------------------------------------------------------------
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_registered_tensors_read_back_as_the_logical_kv(engine: str) -> None:
    make, kw = ENGINES[engine]
    ref = reference()
    blocks = register_kv_caches(make(ref), LAYOUT, **kw)
    assert blocks.num_blocks == NB
    assert torch.equal(logical(blocks), ref)


def test_vllm_dim_order_is_detected() -> None:
    ref = reference()
    assert register_kv_caches(vllm_kv_first(ref), LAYOUT).engine == "vllm"
    assert register_kv_caches(vllm_blocks_first(ref), LAYOUT).engine == "vllm[blocks-first]"
    assert register_kv_caches(vllm_bhnc(ref), LAYOUT).engine == "vllm-bhnc"
    assert register_kv_caches(vllm_cpu_backend(ref), LAYOUT, form="vllm-cpu").engine == "vllm-cpu"


def test_vllm_dict_of_layers_is_taken_in_order() -> None:
    ref = reference()
    kv = {f"model.layers.{i}.self_attn": t for i, t in enumerate(vllm_kv_first(ref))}
    blocks = register_kv_caches(kv, LAYOUT)
    assert torch.equal(logical(blocks), ref)
    assert blocks.layer_index("model.layers.2.self_attn") == 2


def test_copy_out_gives_fully_contiguous_blocks_for_every_engine() -> None:
    ref = reference()
    for engine, (make, kw) in ENGINES.items():
        blocks = register_kv_caches(make(ref), LAYOUT, **kw)
        dst = host_bufs(3)
        blocks.copy_out([7, 0, 11], dst)
        for d, b in zip(dst, [7, 0, 11]):
            assert np.array_equal(d, block_bytes(ref, b)), engine


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_every_strategy_and_backend_gives_identical_bytes(engine: str) -> None:
    make, kw = ENGINES[engine]
    ref = reference()
    ids = [5, 2, 9, 3]
    outs = {}
    for name, cfg in TRANSFERS.items():
        outs[name] = host_bufs(4)
        register_kv_caches(make(ref), LAYOUT, transfer=cfg, **kw).copy_out(ids, outs[name])
    first = outs["gather-torch"]
    for name, out in outs.items():
        assert all(np.array_equal(x, y) for x, y in zip(first, out)), name
    assert np.array_equal(first[0], block_bytes(ref, 5))


@pytest.mark.parametrize("transfer", sorted(TRANSFERS))
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_copy_in_writes_only_the_named_blocks(engine: str, transfer: str) -> None:
    make, kw = ENGINES[engine]
    ref = reference()
    blocks = register_kv_caches(make(torch.zeros_like(ref)), LAYOUT, transfer=TRANSFERS[transfer], **kw)
    blocks.copy_in([4, 1], [block_bytes(ref, 0), block_bytes(ref, 6)])
    got = logical(blocks)
    assert torch.equal(got[4], ref[0]) and torch.equal(got[1], ref[6])
    untouched = [b for b in range(NB) if b not in (1, 4)]
    assert not got[untouched].any()


@pytest.mark.parametrize("transfer", sorted(TRANSFERS))
@pytest.mark.parametrize("engine", ["vllm_kv_first", "vllm_bhnc_ratio2", "trtllm_nhd"])
def test_layer_copies_touch_only_that_layer(engine: str, transfer: str) -> None:
    make, kw = ENGINES[engine]
    ref = reference()
    S = LAYOUT.bytes_per_layer
    src = register_kv_caches(make(ref), LAYOUT, transfer=TRANSFERS[transfer], **kw)
    out = list(np.full((2, LAYOUT.bytes_per_block), 0xAB, dtype=np.uint8))
    src.copy_layer_out(2, [9, 4], out)
    for b, buf in zip([9, 4], out):
        assert np.array_equal(buf[2 * S:3 * S], block_bytes(ref, b)[2 * S:3 * S])
        assert (buf[:2 * S] == 0xAB).all() and (buf[3 * S:] == 0xAB).all()
    dst = register_kv_caches(make(torch.zeros_like(ref)), LAYOUT, transfer=TRANSFERS[transfer], **kw)
    dst.copy_layer_in(1, [3], [block_bytes(ref, 7)])
    want = torch.zeros_like(ref)
    want[3, 1] = ref[7, 1]
    assert torch.equal(logical(dst), want)


def test_engine_blocks_on_cpu_tensors_is_the_core_class() -> None:
    from kvbm.engine_blocks import LayerSeparateBlocks, engine_blocks

    plugins = build_plugins(env={"KVBM_PLUGINS": "gpu"})
    assert type(engine_blocks(vllm_kv_first(reference()), LAYOUT, plugins=plugins)) is LayerSeparateBlocks


def test_gather_splits_a_batch_larger_than_its_staging() -> None:
    ref = reference()
    # Staging of 3 blocks' bytes: halves of 1.5 blocks, so a batch of 10 runs in pieces.
    cfg = TransferConfig(strategy="gather", staging_bytes=3 * LAYOUT.bytes_per_block)
    src = register_kv_caches(vllm_kv_first(ref), LAYOUT, transfer=cfg)
    dst = host_bufs(10)
    src.copy_out(range(10), dst)
    assert all(np.array_equal(d, block_bytes(ref, b)) for b, d in enumerate(dst))
    back = register_kv_caches(vllm_kv_first(torch.zeros_like(ref)), LAYOUT, transfer=cfg)
    back.copy_in(range(10), dst)
    assert torch.equal(logical(back)[:10], ref[:10])


def test_direct_splits_a_batch_larger_than_its_device_buffer() -> None:
    ref = reference()
    # A device buffer of 3 blocks' bytes: a batch of 10 runs in 4 pieces through it.
    cfg = TransferConfig(strategy="direct", staging_bytes=3 * LAYOUT.bytes_per_block)
    ids = [9, 2, 11, 0, 7, 3, 10, 5, 1, 6]
    src = register_kv_caches(vllm_kv_first(ref), LAYOUT, transfer=cfg)
    dst = host_bufs(10)
    src.copy_out(ids, dst)
    assert all(np.array_equal(d, block_bytes(ref, b)) for b, d in zip(ids, dst))
    back = register_kv_caches(vllm_kv_first(torch.zeros_like(ref)), LAYOUT, transfer=cfg)
    back.copy_in(ids, dst)
    assert torch.equal(logical(back)[ids], ref[ids])


@pytest.mark.parametrize("order", ["adjacent", "shuffled"])
def test_direct_copies_adjacent_arena_slots_as_one_and_each_byte_lands(order: str) -> None:
    ref = reference()
    bb = LAYOUT.bytes_per_block
    arena = np.full((12, bb), 0xAB, dtype=np.uint8)
    slots = [2, 3, 4, 5, 9, 10] if order == "adjacent" else [5, 2, 10, 3, 9, 4]
    ids = [8, 1, 11, 4, 6, 10]
    cfg = TransferConfig(strategy="direct")
    register_kv_caches(vllm_kv_first(ref), LAYOUT, transfer=cfg).copy_out(
        ids, [arena[s] for s in slots])
    for s, b in zip(slots, ids):
        assert np.array_equal(arena[s], block_bytes(ref, b)), (s, b)
    untouched = [s for s in range(12) if s not in slots]
    assert (arena[untouched] == 0xAB).all()
    back = register_kv_caches(vllm_kv_first(torch.zeros_like(ref)), LAYOUT, transfer=cfg)
    back.copy_in(ids, [arena[s] for s in slots])
    assert torch.equal(logical(back)[ids], ref[ids])


def test_mla_tensors_roundtrip_through_host_buffers() -> None:
    ref = reference(outer=1, heads=1)
    kv = [ref[:, li, 0, :, 0, :].contiguous() for li in range(L)]  # [blocks, page, hd]
    blocks = register_kv_caches(kv, MLA_LAYOUT)
    assert blocks.engine == "mla"
    dst = host_bufs(2, MLA_LAYOUT)
    blocks.copy_out([3, 8], dst)
    assert np.array_equal(dst[1], block_bytes(ref, 8))
    empty = register_kv_caches([torch.zeros_like(t) for t in kv], MLA_LAYOUT, transfer=GATHER)
    empty.copy_in([0, 1], dst)
    assert torch.equal(logical(empty)[:2], ref[[3, 8]])


def test_auto_threshold_on_cpu_follows_the_copy_backend() -> None:
    kv = vllm_kv_first(reference())
    # Small runs: worth gathering behind torch's per-call cost, not behind numpy's.
    torch_copies = TransferConfig(copy_backend="torch")
    assert register_kv_caches(kv, LAYOUT, transfer=torch_copies).strategy() == "gather"
    assert register_kv_caches(kv, LAYOUT).strategy() == "per_block"


def test_cpu_tensors_copy_with_numpy_by_default() -> None:
    assert register_kv_caches(vllm_kv_first(reference()), LAYOUT).copy_backend == "numpy"


def test_own_pool_is_zeroed_and_fully_contiguous() -> None:
    blocks = DeviceBlocks.allocate(LAYOUT, 5, "cpu")
    assert blocks.block_run_bytes == LAYOUT.bytes_per_block
    assert not logical(blocks).any()


def test_auto_gathers_only_below_the_threshold() -> None:
    ref = reference()
    small = TransferConfig(gather_below_bytes=LAYOUT.bytes_per_block)
    # vLLM [2, blocks, …]: a run is one K or V page of one layer, smaller than a block.
    assert register_kv_caches(vllm_kv_first(ref), LAYOUT, transfer=small).strategy() == "gather"
    # TensorRT-LLM NHD: a block is one run, not below a threshold of one block.
    assert register_kv_caches(trtllm_nhd(ref), LAYOUT, transfer=small).strategy() == "per_block"


# -- through the manager ----------------------------------------------------------------
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_roundtrip_through_manager_and_host_tier(engine: str) -> None:
    make, kw = ENGINES[engine]
    ref = reference()
    src = register_kv_caches(make(ref), LAYOUT, **kw)
    dst = register_kv_caches(make(torch.zeros_like(ref)), LAYOUT, **kw)
    tokens = list(range(3 * PAGE))
    with make_manager() as mgr:
        hashes = mgr.hash_tokens(tokens)
        res = mgr.offload(hashes, src, indices=[6, 2, 10])
        assert res.stored == 3
        with mgr.match_prefix(tokens) as match:
            out = mgr.onboard(match, dst, indices=[0, 1, 5])
        assert out.loaded == 3
    got = logical(dst)
    assert torch.equal(got[[0, 1, 5]], ref[[6, 2, 10]])


def test_blocks_offloaded_from_vllm_onboard_into_trtllm_pool() -> None:
    ref = reference()
    src = register_kv_caches(vllm_kv_first(ref), LAYOUT)
    dst = register_kv_caches(trtllm_hnd(torch.zeros_like(ref)), LAYOUT, kv_layout="HND")
    tokens = list(range(2 * PAGE))
    with make_manager() as mgr:
        mgr.offload(mgr.hash_tokens(tokens), src, indices=[3, 4])
        with mgr.match_prefix(tokens) as match:
            assert mgr.onboard(match, dst, indices=[8, 9]).loaded == 2
    assert torch.equal(logical(dst)[[8, 9]], ref[[3, 4]])


# -- bad input ----------------------------------------------------------------------------
def test_wrong_dtype_names_expected_and_got() -> None:
    kv = [t.float() for t in vllm_kv_first(reference())]
    with pytest.raises(LayoutError, match=r"expected dtype torch.bfloat16.*got torch.float32"):
        register_kv_caches(kv, LAYOUT)


def test_wrong_shape_names_expected_and_got() -> None:
    kv = vllm_kv_first(reference())
    kv[2] = kv[2][:, :5]
    with pytest.raises(LayoutError, match=r"kv_caches\['2'\]: expected shape \[2, 12, 4, 2, 8\].*got \[2, 5, 4, 2, 8\]"):
        register_kv_caches(kv, LAYOUT)


def test_wrong_trailing_dims_name_the_layout() -> None:
    kv = [torch.zeros(2, NB, PAGE, HEADS, HD * 2, dtype=torch.bfloat16) for _ in range(L)]
    with pytest.raises(LayoutError, match=r"head_dim=8\], got \[4, 2, 16\]"):
        register_kv_caches(kv, LAYOUT)


def test_wrong_number_of_layers_is_an_error() -> None:
    with pytest.raises(LayoutError, match="expected 4 layer tensors.*got 3"):
        register_kv_caches(vllm_kv_first(reference())[:3], LAYOUT)


def test_wrong_device_is_an_error() -> None:
    with pytest.raises(LayoutError, match="expected device meta.*got cpu"):
        register_kv_caches([torch.empty(2, NB, PAGE, HEADS, HD, dtype=torch.bfloat16, device="meta")]
                           + vllm_kv_first(reference())[1:], LAYOUT)


def test_head_dim_not_innermost_is_a_stride_error() -> None:
    kv = [torch.zeros(2, NB, PAGE, HD, HEADS, dtype=torch.bfloat16).transpose(3, 4) for _ in range(L)]
    with pytest.raises(LayoutError, match="head_dim.*stride 1"):
        register_kv_caches(kv, LAYOUT)


def test_overlapping_strides_are_an_error() -> None:
    one = torch.zeros(2, 1, PAGE, HEADS, HD, dtype=torch.bfloat16)
    kv = [one.expand(2, NB, PAGE, HEADS, HD) for _ in range(L)]
    with pytest.raises(LayoutError, match="do not overlap"):
        register_kv_caches(kv, LAYOUT)


def test_non_contiguous_pool_is_an_error() -> None:
    pool = torch.zeros(L, NB, 2, PAGE * HEADS * HD, dtype=torch.bfloat16).transpose(0, 1)
    with pytest.raises(LayoutError, match="expected a contiguous tensor"):
        register_kv_caches(pool, LAYOUT)


def test_pool_of_wrong_block_size_is_an_error() -> None:
    pool = torch.zeros(NB, L, 2, 100, dtype=torch.bfloat16)
    with pytest.raises(LayoutError, match=r"page\*heads\*head_dim=64\].*got \[12, 4, 2, 100\]"):
        register_kv_caches(pool, LAYOUT)


def test_ambiguous_dim_order_asks_for_block_dim() -> None:
    kv = [torch.zeros(2, 2, PAGE, HEADS, HD, dtype=torch.bfloat16) for _ in range(L)]
    with pytest.raises(LayoutError, match="ambiguous.*block_dim"):
        register_kv_caches(kv, LAYOUT)
    assert register_kv_caches(kv, LAYOUT, block_dim=1).num_blocks == 2


def test_block_id_out_of_range_fails_before_any_copy() -> None:
    ref = reference()
    blocks = register_kv_caches(vllm_kv_first(torch.zeros_like(ref)), LAYOUT)
    with pytest.raises(LayoutError, match=r"block id 12 is out of range \[0, 12\)"):
        blocks.copy_in([0, 12], [block_bytes(ref, 0), block_bytes(ref, 1)])
    assert not logical(blocks).any()


def test_duplicate_destination_block_is_an_error() -> None:
    blocks = register_kv_caches(vllm_kv_first(reference()), LAYOUT)
    with pytest.raises(LayoutError, match="block id 3 appears twice"):
        blocks.copy_in([3, 3], host_bufs(2))


def test_buffer_of_another_layout_is_an_error_naming_sizes() -> None:
    blocks = register_kv_caches(vllm_kv_first(reference()), LAYOUT)
    with pytest.raises(LayoutError, match=r"dst\[0\]: expected 1024 bytes.*got uint8 with 512 bytes"):
        blocks.copy_out([0], [np.zeros(512, np.uint8)])


def test_manager_of_another_layout_is_a_layout_mismatch() -> None:
    blocks = register_kv_caches(vllm_kv_first(reference()), LAYOUT)
    with pytest.raises(LayoutError, match="layout mismatch.*got a layout of shape \\[4, 2, 8, 16\\]"):
        blocks.check_layout(BlockLayout(ModelSpec(L, HEADS, HD, "bfloat16"), 8))
