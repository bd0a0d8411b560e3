"""The native batch copy of the engine-tensor adapter: every form, whole blocks and single
layers, byte-exact against the logical KV and against the numpy path it replaces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import test_engine_blocks as eb  # noqa: E402

from kvbm.engine_blocks import _native, adapter  # noqa: E402

if _native.copy_runs() is None:  # pragma: no cover - a machine without a C compiler
    pytest.skip("no C compiler: the native copy loop is not built here", allow_module_level=True)

# Forms whose (block, layer) slices split into equal runs that tile one layer's bytes.
PLANNED = {"vllm-kv-first", "vllm-blocks-first", "vllm-hnd-storage", "vllm-0.33-ratio1",
           "vllm-0.33-ratio1-nhc", "vllm-0.33-ratio2", "vllm-0.33-ratio2-nhc",
           "vllm-0.33-ratio4-cross-layer", "vllm-cpu-backend", "trtllm-nhd", "trtllm-hnd",
           "mla-3dim", "mla-0.33"}


@pytest.fixture(autouse=True)
def tiny_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test layouts' runs are a few bytes: let the native loop take them anyway."""
    monkeypatch.setattr(adapter, "_NATIVE_MIN_RUN", 1)
    monkeypatch.setattr(_native, "enabled", True)


def test_the_native_plan_serves_every_form_of_the_test_layouts() -> None:
    for form in sorted(eb.FORMS):
        blocks, _ = eb.build(form, eb.ref_for(form))
        assert (blocks._run_plan() is not None) == (form in PLANNED), form


@pytest.mark.parametrize("form", sorted(eb.FORMS))
def test_native_copy_out_gives_each_block_in_canonical_order(form: str) -> None:
    ref = eb.ref_for(form)
    blocks, _ = eb.build(form, ref)
    ids = [4, 0, 5, 4]
    out = eb.bufs(len(ids), eb.FORMS[form][0], fill=7)
    blocks.copy_out(ids, out)
    for b, buf in zip(ids, out):
        assert np.array_equal(buf, eb.block_bytes(ref, b))


@pytest.mark.parametrize("form", sorted(eb.FORMS))
def test_native_copy_in_writes_exactly_the_named_blocks(form: str) -> None:
    ref = eb.ref_for(form)
    blocks, tensors = eb.build(form, torch.zeros_like(ref))
    blocks.copy_in([3, 1], [eb.block_bytes(ref, 0), eb.block_bytes(ref, 5)])
    want = torch.zeros_like(ref)
    want[3], want[1] = ref[0], ref[5]
    assert eb.same_tensors(tensors, eb.FORMS[form][1](want))


@pytest.mark.parametrize("form", sorted(eb.FORMS))
def test_native_layer_copies_touch_only_that_layer(form: str) -> None:
    ref = eb.ref_for(form)
    layout = eb.FORMS[form][0]
    blocks, _ = eb.build(form, ref)
    out = eb.bufs(2, layout, fill=9)
    blocks.copy_layer_out(1, [2, 5], out)
    bpl = layout.bytes_per_layer
    for b, buf in zip([2, 5], out):
        whole = eb.block_bytes(ref, b)
        assert np.array_equal(buf[bpl:2 * bpl], whole[bpl:2 * bpl])
        assert (buf[:bpl] == 9).all() and (buf[2 * bpl:] == 9).all()
    dst, tensors = eb.build(form, torch.zeros_like(ref))
    dst.copy_layer_in(2, [0], [eb.block_bytes(ref, 3)])
    want = torch.zeros_like(ref)
    want[0, 2] = ref[3, 2]
    assert eb.same_tensors(tensors, eb.FORMS[form][1](want))


@settings(max_examples=40, deadline=None)
@given(form=st.sampled_from(sorted(eb.FORMS)),
       ids=st.lists(st.integers(0, eb.NB - 1), min_size=1, max_size=eb.NB, unique=True),
       layers=st.tuples(st.integers(0, eb.L - 1), st.integers(1, eb.L)))
def test_native_and_numpy_paths_move_the_same_bytes(form: str, ids: list[int],
                                                    layers: tuple[int, int]) -> None:
    l0, l1 = min(layers[0], layers[1] - 1), max(layers[0] + 1, layers[1])
    ref = eb.ref_for(form, seed=len(ids))
    layout = eb.FORMS[form][0]
    got = {}
    for native in (True, False):
        _native.enabled = native
        try:
            src, _ = eb.build(form, ref)
            out = eb.bufs(len(ids), layout, fill=3)
            for li in range(l0, l1):
                src.copy_layer_out(li, ids, out)
            dst, tensors = eb.build(form, torch.zeros_like(ref))
            dst.copy_in(ids, out)
            got[native] = ([b.copy() for b in out], [t.clone() for t in eb.flat(tensors)])
        finally:
            _native.enabled = True
    assert all(np.array_equal(a, b) for a, b in zip(got[True][0], got[False][0]))
    assert all(torch.equal(a, b) for a, b in zip(got[True][1], got[False][1]))


def test_copy_pairs_copies_each_buffer_into_its_partner() -> None:
    rng = np.random.default_rng(0)
    src = [rng.integers(0, 256, 4096, dtype=np.uint8) for _ in range(5)]
    dst = [np.zeros(4096, dtype=np.uint8) for _ in range(5)]
    _native.copy_pairs(dst[::-1], src)
    for d, s in zip(dst[::-1], src):
        assert np.array_equal(d, s)


@pytest.mark.parametrize("order", [False, True], ids=["block-order", "engine-order"])
@pytest.mark.parametrize("form", sorted(PLANNED))
def test_native_copies_are_exact_in_block_and_engine_address_order(
        form: str, order: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs copied sorted by engine address (the default) or block by block: the same
    bytes land in the same places, both ways."""
    monkeypatch.setattr(adapter, "_ENGINE_ORDER", order)
    ref = eb.ref_for(form)
    blocks, _ = eb.build(form, ref)
    ids = [5, 0, 4, 2]
    out = eb.bufs(len(ids), eb.FORMS[form][0], fill=7)
    blocks.copy_out(ids, out)
    for b, buf in zip(ids, out):
        assert np.array_equal(buf, eb.block_bytes(ref, b))
    blocks, tensors = eb.build(form, torch.zeros_like(ref))
    blocks.copy_in([3, 1, 0], [eb.block_bytes(ref, 0), eb.block_bytes(ref, 5),
                               eb.block_bytes(ref, 2)])
    want = torch.zeros_like(ref)
    want[3], want[1], want[0] = ref[0], ref[5], ref[2]
    assert eb.same_tensors(tensors, eb.FORMS[form][1](want))
