"""The core engine-tensor adapter on CPU tensors: every form round trips byte-exact,
layer copies touch one layer, and a block moves between forms unchanged."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm.engine_blocks import LayerSeparateBlocks  # noqa: E402
from kvbm.layout import BlockLayout, ModelSpec  # noqa: E402

L, HEADS, HD, PAGE, NB = 3, 2, 4, 4, 6
LAYOUT = BlockLayout(ModelSpec(L, HEADS, HD, "bfloat16"), PAGE)
MLA_LAYOUT = BlockLayout(ModelSpec(L, 1, HD, "bfloat16", outer_dim=1), PAGE)


def reference(outer: int = 2, heads: int = HEADS, seed: int = 0) -> torch.Tensor:
    """The logical KV ``[blocks, layers, outer, page, heads, head_dim]``, distinct values."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NB, L, outer, PAGE, heads, HD, generator=g).to(torch.bfloat16)


def block_bytes(ref: torch.Tensor, b: int) -> np.ndarray:
    """Block ``b`` of ``ref`` in kvbm's canonical contiguous order."""
    return ref[b].contiguous().view(torch.uint8).numpy().reshape(-1)


# -- every form of the same logical KV ------------------------------------------------------
def vllm_kv_first(ref: torch.Tensor) -> list[torch.Tensor]:
    return [ref[:, li].transpose(0, 1).contiguous() for li in range(L)]


def vllm_blocks_first(ref: torch.Tensor) -> list[torch.Tensor]:
    return [ref[:, li].contiguous() for li in range(L)]


def vllm_hnd_storage(ref: torch.Tensor) -> list[torch.Tensor]:
    # [blocks, 2, heads, page, hd] in memory, handed out as [blocks, 2, page, heads, hd].
    return [ref[:, li].permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
            for li in range(L)]


def bhnc(ref: torch.Tensor, ratio: int = 1, storage: str = "HNC") -> dict[str, torch.Tensor]:
    """vLLM 0.33's logical ``[blocks*ratio, heads, tokens, K|V]`` per layer.

    ``storage`` is the memory order inside a kernel block: ``HNC`` (contiguous logical)
    or ``NHC`` (tokens outside heads); ``cross-layer`` puts every layer in one
    allocation, block-major (``[blocks*ratio, layers, H, N, C]``).
    """
    nb, _, outer, page, heads, hd = ref.shape
    n = page // ratio
    # [nb, L, kv, r, n, h, hd] -> [nb, r, L, h, n, kv, hd]: K|V inside C, per token.
    t = ref.reshape(nb, L, outer, ratio, n, heads, hd).permute(0, 3, 1, 5, 4, 2, 6)
    if storage == "cross-layer":
        raw = t.contiguous().reshape(nb * ratio, L, heads, n, outer * hd)
        return {f"model.layers.{li}.attn": raw[:, li] for li in range(L)}
    out = {}
    for li in range(L):
        x = t[:, :, li]  # [nb, r, h, n, kv, hd]
        if storage == "NHC":
            mem = x.permute(0, 1, 3, 2, 4, 5).contiguous().reshape(nb * ratio, n, heads, outer * hd)
            out[f"model.layers.{li}.attn"] = mem.transpose(1, 2)
        else:
            out[f"model.layers.{li}.attn"] = x.contiguous().reshape(nb * ratio, heads, n, outer * hd)
    return out


def vllm_cpu_backend(ref: torch.Tensor) -> list[torch.Tensor]:
    # vLLM's CPU attention reads [blocks, heads, page, 2*hd] as memory [blocks, heads, 2, page, hd].
    return [ref[:, li].permute(0, 3, 1, 2, 4).contiguous().reshape(NB, HEADS, PAGE, 2 * HD)
            for li in range(L)]


def trtllm_nhd(ref: torch.Tensor) -> torch.Tensor:
    return ref.contiguous().reshape(NB, L, 2, -1)


def trtllm_hnd(ref: torch.Tensor) -> torch.Tensor:
    return ref.permute(0, 1, 2, 4, 3, 5).contiguous().reshape(NB, L, 2, -1)


def mla_3dim(ref: torch.Tensor) -> list[torch.Tensor]:
    return [ref[:, li, 0, :, 0, :].contiguous() for li in range(L)]


Make = Callable[[torch.Tensor], Any]
Build = Callable[[Any, BlockLayout], LayerSeparateBlocks]
# name: (layout, make tensors from the logical KV, build the adapter from them)
FORMS: dict[str, tuple[BlockLayout, Make, Build]] = {
    "vllm-kv-first": (LAYOUT, vllm_kv_first, LayerSeparateBlocks),
    "vllm-blocks-first": (LAYOUT, vllm_blocks_first, LayerSeparateBlocks.from_vllm),
    "vllm-hnd-storage": (LAYOUT, vllm_hnd_storage, LayerSeparateBlocks),
    "vllm-0.33-ratio1": (LAYOUT, bhnc, lambda kv, lay: LayerSeparateBlocks(kv, lay, num_blocks=NB)),
    "vllm-0.33-ratio1-nhc": (LAYOUT, lambda r: bhnc(r, 1, "NHC"), LayerSeparateBlocks.from_vllm_bhnc),
    "vllm-0.33-ratio2": (LAYOUT, lambda r: bhnc(r, 2),
                         lambda kv, lay: LayerSeparateBlocks.from_vllm_bhnc(kv, lay, num_blocks=NB)),
    "vllm-0.33-ratio2-nhc": (LAYOUT, lambda r: bhnc(r, 2, "NHC"), LayerSeparateBlocks),
    "vllm-0.33-ratio4-cross-layer": (LAYOUT, lambda r: bhnc(r, 4, "cross-layer"),
                                     lambda kv, lay: LayerSeparateBlocks(kv, lay, num_blocks=NB)),
    "vllm-cpu-backend": (LAYOUT, vllm_cpu_backend,
                         lambda kv, lay: LayerSeparateBlocks(kv, lay, form="vllm-cpu")),
    "trtllm-nhd": (LAYOUT, trtllm_nhd, LayerSeparateBlocks),
    "trtllm-hnd": (LAYOUT, trtllm_hnd,
                   lambda p, lay: LayerSeparateBlocks.from_pool(p, lay, kv_layout="HND")),
    "mla-3dim": (MLA_LAYOUT, mla_3dim, LayerSeparateBlocks.from_mla),
    "mla-0.33": (MLA_LAYOUT, lambda r: bhnc(r, 2),
                 lambda kv, lay: LayerSeparateBlocks.from_mla(kv, lay, num_blocks=NB)),
}
KV_FORMS = sorted(n for n, f in FORMS.items() if f[0] is LAYOUT)
MLA_FORMS = sorted(n for n, f in FORMS.items() if f[0] is MLA_LAYOUT)


def ref_for(form: str, seed: int = 0) -> torch.Tensor:
    return reference(seed=seed) if FORMS[form][0] is LAYOUT else reference(1, 1, seed=seed)


def build(form: str, ref: torch.Tensor) -> tuple[LayerSeparateBlocks, Any]:
    layout, make, ctor = FORMS[form]
    tensors = make(ref)
    return ctor(tensors, layout), tensors


def flat(tensors: Any) -> list[torch.Tensor]:
    """Every engine tensor, for comparing two arrangements element by element."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    return list(tensors.values()) if isinstance(tensors, dict) else list(tensors)


def same_tensors(a: Any, b: Any) -> bool:
    return all(torch.equal(x, y) for x, y in zip(flat(a), flat(b), strict=True))


def bufs(n: int, layout: BlockLayout, fill: int = 0) -> list[np.ndarray]:
    return list(np.full((n, layout.bytes_per_block), fill, dtype=np.uint8))


# -- whole blocks -----------------------------------------------------------------------
@pytest.mark.parametrize("form", sorted(FORMS))
def test_copy_out_gives_each_block_in_canonical_contiguous_order(form: str) -> None:
    ref = ref_for(form)
    blocks, _ = build(form, ref)
    ids = [4, 0, 5]
    out = bufs(3, FORMS[form][0])
    blocks.copy_out(ids, out)
    for b, buf in zip(ids, out):
        assert np.array_equal(buf, block_bytes(ref, b))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_copy_in_writes_exactly_the_named_blocks(form: str) -> None:
    ref = ref_for(form)
    blocks, tensors = build(form, torch.zeros_like(ref))
    blocks.copy_in([3, 1], [block_bytes(ref, 0), block_bytes(ref, 5)])
    want = torch.zeros_like(ref)
    want[3], want[1] = ref[0], ref[5]
    assert same_tensors(tensors, FORMS[form][1](want))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_round_trip_through_buffers_is_byte_exact(form: str) -> None:
    ref = ref_for(form)
    src, _ = build(form, ref)
    dst, dst_tensors = build(form, torch.zeros_like(ref))
    out = bufs(NB, FORMS[form][0])
    src.copy_out(range(NB), out)
    dst.copy_in(range(NB), out)
    assert same_tensors(dst_tensors, FORMS[form][1](ref))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_adapter_reports_blocks_layers_device_and_names(form: str) -> None:
    blocks, tensors = build(form, ref_for(form))
    assert (blocks.num_blocks, blocks.num_layers, str(blocks.device)) == (NB, L, "cpu")
    assert blocks.layout is FORMS[form][0]
    names = list(tensors) if isinstance(tensors, dict) else [str(i) for i in range(L)]
    assert blocks.layer_names == names
    assert blocks.layer_index(names[2]) == 2
    blocks.synchronize()  # nothing is queued on CPU: returns at once


def test_vllm_033_block_is_read_as_the_vllm_worker_views_it() -> None:
    # kvbm/connectors/vllm.py views manager block b of layer l as
    # t.unflatten(0, (nb, ratio))[b].view(r, h, n, outer, hd).permute(3, 0, 2, 1, 4).
    ratio, n = 2, PAGE // 2
    kv = {f"l{i}": torch.randn(NB * ratio, HEADS, n, 2 * HD).to(torch.bfloat16) for i in range(L)}
    out = bufs(1, LAYOUT)
    LayerSeparateBlocks(kv, LAYOUT, num_blocks=NB).copy_out([4], out)
    got = torch.from_numpy(out[0]).view(torch.bfloat16).view(L, 2, ratio, n, HEADS, HD)
    for li, t in enumerate(kv.values()):
        worker = t.unflatten(0, (NB, ratio))[4].view(ratio, HEADS, n, 2, HD).permute(3, 0, 2, 1, 4)
        assert torch.equal(got[li], worker)


def test_vllm_033_ratio_follows_from_tokens_per_kernel_block() -> None:
    kv = bhnc(reference(), ratio=2)
    assert LayerSeparateBlocks(kv, LAYOUT).num_blocks == NB
    assert LayerSeparateBlocks(kv, LAYOUT, num_blocks=NB).engine == "vllm-bhnc"


def test_old_positional_block_dim_still_selects_the_block_dim() -> None:
    kv = [torch.zeros(2, 2, PAGE, HEADS, HD, dtype=torch.bfloat16) for _ in range(L)]
    blocks = LayerSeparateBlocks(kv, LAYOUT, 1)
    assert (blocks.block_dim, blocks.num_blocks) == (1, 2)


def test_own_pool_starts_zeroed_and_round_trips() -> None:
    ref = reference()
    pool = LayerSeparateBlocks.allocate(LAYOUT, NB, "cpu")
    assert pool.engine == "own" and not pool.raw.any()
    pool.copy_in([2], [block_bytes(ref, 1)])
    out = bufs(2, LAYOUT, fill=7)
    pool.copy_out([2, 0], out)
    assert np.array_equal(out[0], block_bytes(ref, 1)) and not out[1].any()


# -- one layer at a time -------------------------------------------------------------------
@pytest.mark.parametrize("form", sorted(FORMS))
def test_copy_layer_out_touches_only_that_layers_slice(form: str) -> None:
    ref = ref_for(form)
    layout = FORMS[form][0]
    blocks, _ = build(form, ref)
    S = layout.bytes_per_layer
    out = bufs(2, layout, fill=0xAB)
    blocks.copy_layer_out(1, [5, 2], out)
    for b, buf in zip([5, 2], out):
        assert np.array_equal(buf[S:2 * S], block_bytes(ref, b)[S:2 * S])
        assert (buf[:S] == 0xAB).all() and (buf[2 * S:] == 0xAB).all()


@pytest.mark.parametrize("form", sorted(FORMS))
def test_copy_layer_in_writes_only_that_layer_of_the_named_blocks(form: str) -> None:
    ref = ref_for(form)
    blocks, tensors = build(form, torch.zeros_like(ref))
    blocks.copy_layer_in(2, [0, 4], [block_bytes(ref, 3), block_bytes(ref, 1)])
    want = torch.zeros_like(ref)
    want[0, 2], want[4, 2] = ref[3, 2], ref[1, 2]
    assert same_tensors(tensors, FORMS[form][1](want))


def test_every_layer_copied_in_turn_equals_one_whole_block_copy() -> None:
    ref = reference()
    src, _ = build("vllm-0.33-ratio2", ref)
    layered, whole = bufs(3, LAYOUT), bufs(3, LAYOUT)
    for li in range(L):
        src.copy_layer_out(li, [1, 3, 5], layered)
    src.copy_out([1, 3, 5], whole)
    assert all(np.array_equal(a, b) for a, b in zip(layered, whole))


def test_layer_copies_take_the_layer_name() -> None:
    ref = reference()
    blocks, tensors = build("vllm-0.33-ratio1", torch.zeros_like(ref))
    blocks.copy_layer_in("model.layers.1.attn", [2], [block_bytes(ref, 2)])
    want = torch.zeros_like(ref)
    want[2, 1] = ref[2, 1]
    assert same_tensors(tensors, bhnc(want))


# -- between forms ---------------------------------------------------------------------------
def _pairs(forms: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in itertools.product(forms, forms) if a != b]


@pytest.mark.parametrize(("src_form", "dst_form"), _pairs(KV_FORMS) + _pairs(MLA_FORMS))
def test_block_copied_out_of_one_form_reads_back_the_same_kv_in_another(
    src_form: str, dst_form: str
) -> None:
    ref = ref_for(src_form, seed=3)
    src, _ = build(src_form, ref)
    dst, dst_tensors = build(dst_form, torch.zeros_like(ref))
    out = bufs(2, FORMS[src_form][0])
    src.copy_out([5, 1], out)
    dst.copy_in([0, 4], out)
    want = torch.zeros_like(ref)
    want[0], want[4] = ref[5], ref[1]
    assert same_tensors(dst_tensors, FORMS[dst_form][1](want))
