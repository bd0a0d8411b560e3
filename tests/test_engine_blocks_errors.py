"""The core engine-tensor adapter: bad input is a LayoutError naming tensor, value and fix;
``engine_blocks`` picks the core class or a plugin's; the core stays light."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvbm import hookimpl  # noqa: E402
from kvbm.engine_blocks import (  # noqa: E402
    LayerSeparateBlocks,
    accelerated_layout_name,
    engine_blocks,
)
from kvbm.errors import LayoutError  # noqa: E402
from kvbm.layout import BlockLayout, ModelSpec  # noqa: E402
from kvbm.plugins import build_plugins  # noqa: E402

L, HEADS, HD, PAGE, NB = 3, 2, 4, 4, 6
LAYOUT = BlockLayout(ModelSpec(L, HEADS, HD, "bfloat16"), PAGE)
BF16 = torch.bfloat16


def bhnc(nb: int = NB, ratio: int = 1, **kw: Any) -> dict[str, torch.Tensor]:
    """vLLM 0.33's per-layer ``[blocks*ratio, heads, tokens, K|V]``, zeroed."""
    shape = (nb * ratio, kw.get("heads", HEADS), PAGE // ratio, kw.get("c", 2 * HD))
    return {f"layer.{i}": torch.zeros(*shape, dtype=kw.get("dtype", BF16)) for i in range(L)}


def vllm5() -> list[torch.Tensor]:
    return [torch.zeros(2, NB, PAGE, HEADS, HD, dtype=BF16) for _ in range(L)]


def buf() -> np.ndarray:
    return np.zeros(LAYOUT.bytes_per_block, np.uint8)


# -- construction ---------------------------------------------------------------------------
def test_wrong_dtype_names_the_layer_expected_and_got() -> None:
    with pytest.raises(LayoutError, match=r"kv_caches\['layer.0'\]: expected dtype torch.bfloat16 "
                                          r"\(model.dtype 'bfloat16'\), got torch.float32"):
        LayerSeparateBlocks(bhnc(dtype=torch.float32), LAYOUT)


def test_wrong_layer_count_names_model_num_layers() -> None:
    kv = dict(list(bhnc().items())[:2])
    with pytest.raises(LayoutError, match=r"expected 3 layer tensors, got 2 \(model.num_layers is 3\)"):
        LayerSeparateBlocks(kv, LAYOUT)


def test_vllm_033_wrong_heads_names_the_shape_and_the_keys_to_check() -> None:
    with pytest.raises(LayoutError, match=r"heads=2, tokens, outer\*head_dim=8\].*got \[6, 3, 4, 8\]"
                                          r".*num_kv_heads"):
        LayerSeparateBlocks(bhnc(heads=3), LAYOUT)


def test_vllm_033_tokens_not_dividing_the_page_is_an_error() -> None:
    kv = {f"l{i}": torch.zeros(NB, HEADS, 3, 2 * HD, dtype=BF16) for i in range(L)}
    with pytest.raises(LayoutError, match="tokens dividing page=4, got \\[6, 2, 3, 8\\]"):
        LayerSeparateBlocks(kv, LAYOUT)


def test_vllm_033_num_blocks_that_does_not_match_kernel_blocks_is_an_error() -> None:
    with pytest.raises(LayoutError, match=r"expected 4 blocks x 2 kernel blocks of 2 tokens "
                                          r"\(page=4\) = 8 on dim 0, got 12"):
        LayerSeparateBlocks(bhnc(ratio=2), LAYOUT, num_blocks=4)


def test_vllm_033_kv_dim_not_innermost_is_a_stride_error() -> None:
    kv = {f"l{i}": torch.zeros(NB, HEADS, 2 * HD, PAGE, dtype=BF16).transpose(2, 3)
          for i in range(L)}
    with pytest.raises(LayoutError, match=r"the K\|V dim C \(the last dim\) to have stride 1"):
        LayerSeparateBlocks(kv, LAYOUT)


def test_overlapping_strides_are_an_error() -> None:
    one = torch.zeros(1, HEADS, PAGE, 2 * HD, dtype=BF16)
    kv = {f"l{i}": one.expand(NB, HEADS, PAGE, 2 * HD) for i in range(L)}
    with pytest.raises(LayoutError, match="do not overlap.*expanded or aliased"):
        LayerSeparateBlocks(kv, LAYOUT)


def test_layers_of_different_shapes_name_the_odd_layer() -> None:
    kv = bhnc()
    kv["layer.2"] = torch.zeros(NB + 1, HEADS, PAGE, 2 * HD, dtype=BF16)
    with pytest.raises(LayoutError, match=r"kv_caches\['layer.2'\]: expected shape \[6, 2, 4, 8\]"):
        LayerSeparateBlocks(kv, LAYOUT)


def test_layer_that_is_not_a_tensor_is_an_error() -> None:
    kv = vllm5()
    kv[1] = np.zeros((2, NB, PAGE, HEADS, HD))  # type: ignore[call-overload]
    with pytest.raises(LayoutError, match=r"kv_caches\['1'\]: expected a torch.Tensor, got ndarray"):
        LayerSeparateBlocks(kv, LAYOUT)


def test_layers_on_two_devices_are_an_error() -> None:
    kv = vllm5()
    kv[2] = torch.empty(2, NB, PAGE, HEADS, HD, dtype=BF16, device="meta")
    with pytest.raises(LayoutError, match="expected device cpu .as the other layers., got meta"):
        LayerSeparateBlocks(kv, LAYOUT)


def test_unknown_form_lists_the_forms() -> None:
    with pytest.raises(LayoutError, match="form: expected one of vllm, vllm-bhnc, vllm-cpu, mla"):
        LayerSeparateBlocks(vllm5(), LAYOUT, form="sglang")


def test_form_given_with_the_wrong_number_of_dims_is_an_error() -> None:
    with pytest.raises(LayoutError, match="form 'vllm-bhnc' expects 4 dims"):
        LayerSeparateBlocks.from_vllm_bhnc(vllm5(), LAYOUT)


def test_mla_constructor_refuses_a_layout_with_k_and_v() -> None:
    with pytest.raises(LayoutError, match="expected model.outer_dim 1, got 2"):
        LayerSeparateBlocks.from_mla(bhnc(), LAYOUT)


def test_pool_with_a_form_asks_for_per_layer_tensors() -> None:
    pool = torch.zeros(NB, L, 2, PAGE * HEADS * HD, dtype=BF16)
    with pytest.raises(LayoutError, match="pass a list or dict"):
        LayerSeparateBlocks(pool, LAYOUT, form="vllm")


def test_something_that_is_no_tensors_is_an_error() -> None:
    with pytest.raises(LayoutError, match="expected a dict or list of per-layer tensors"):
        LayerSeparateBlocks(42, LAYOUT)


# -- copies ----------------------------------------------------------------------------------
def test_block_id_out_of_range_fails_before_any_copy() -> None:
    kv = bhnc()
    blocks = LayerSeparateBlocks(kv, LAYOUT)
    ones = np.ones(LAYOUT.bytes_per_block, np.uint8)
    with pytest.raises(LayoutError, match=r"block id 6 is out of range \[0, 6\)"):
        blocks.copy_in([0, 6], [ones, ones])
    assert not any(t.any() for t in kv.values())


def test_duplicate_destination_block_is_an_error() -> None:
    with pytest.raises(LayoutError, match="block id 2 appears twice"):
        LayerSeparateBlocks(bhnc(), LAYOUT).copy_in([2, 2], [buf(), buf()])


def test_buffer_of_another_size_names_expected_and_got() -> None:
    with pytest.raises(LayoutError, match=rf"dst\[0\]: expected {LAYOUT.bytes_per_block} bytes"
                                          r".*got uint8 with 10 bytes"):
        LayerSeparateBlocks(bhnc(), LAYOUT).copy_out([0], [np.zeros(10, np.uint8)])


def test_read_only_destination_buffer_is_an_error() -> None:
    ro = buf()
    ro.flags.writeable = False
    with pytest.raises(LayoutError, match=r"dst\[0\]: expected a writable buffer"):
        LayerSeparateBlocks(bhnc(), LAYOUT).copy_out([0], [ro])


def test_fewer_buffers_than_block_ids_is_an_error() -> None:
    with pytest.raises(LayoutError, match=r"src: expected 2 buffers \(one per block id\), got 1"):
        LayerSeparateBlocks(bhnc(), LAYOUT).copy_in([0, 1], [buf()])


def test_layer_out_of_range_is_an_error() -> None:
    with pytest.raises(LayoutError, match=r"layer 3 is out of range \[0, 3\)"):
        LayerSeparateBlocks(bhnc(), LAYOUT).copy_layer_out(3, [0], [buf()])


def test_unknown_layer_name_lists_the_known_ones() -> None:
    with pytest.raises(LayoutError, match="layer 'layer.9' is not a registered layer; known: "
                                          "layer.0, layer.1, layer.2"):
        LayerSeparateBlocks(bhnc(), LAYOUT).copy_layer_in("layer.9", [0], [buf()])


# -- picking the adapter -----------------------------------------------------------------------
class MetaBlocks(LayerSeparateBlocks):
    """A plugin's accelerated adapter, for tensors on the meta device."""


def _accel_plugin() -> types.ModuleType:
    home = types.ModuleType("kvbm_test_accel")
    home.MetaBlocks = MetaBlocks  # type: ignore[attr-defined]
    sys.modules["kvbm_test_accel"] = home

    def kvbm_register_layouts(registry: Any) -> None:
        registry.add(accelerated_layout_name("meta"), factory="kvbm_test_accel:MetaBlocks")

    plugin = types.ModuleType("accel_plugin")
    plugin.kvbm_register_layouts = hookimpl(kvbm_register_layouts)  # type: ignore[attr-defined]
    return plugin


def meta_layers() -> list[torch.Tensor]:
    return [torch.empty(2, NB, PAGE, HEADS, HD, dtype=BF16, device="meta") for _ in range(L)]


def test_engine_blocks_gives_the_core_class_for_cpu_tensors() -> None:
    plugins = build_plugins(env={"KVBM_PLUGINS": "gpu"}, extra_plugins=[_accel_plugin()])
    blocks = engine_blocks(bhnc(ratio=2), LAYOUT, num_blocks=NB, plugins=plugins)
    assert type(blocks) is LayerSeparateBlocks and blocks.num_blocks == NB


def test_engine_blocks_gives_the_class_a_plugin_registered_for_the_device() -> None:
    plugins = build_plugins(env={"KVBM_PLUGINS": "host"}, extra_plugins=[_accel_plugin()])
    blocks = engine_blocks(meta_layers(), LAYOUT, names=["a", "b", "c"], plugins=plugins)
    assert type(blocks) is MetaBlocks and blocks.layer_names == ["a", "b", "c"]


def test_engine_blocks_falls_back_to_the_core_class_when_no_plugin_offers_one() -> None:
    plugins = build_plugins(env={"KVBM_PLUGINS": "host"})
    blocks = engine_blocks(meta_layers(), LAYOUT, plugins=plugins)
    assert type(blocks) is LayerSeparateBlocks and blocks.device.type == "meta"


def test_engine_blocks_of_something_without_a_device_is_a_layout_error() -> None:
    with pytest.raises(LayoutError, match="expected torch tensors.*got ndarray"):
        engine_blocks([np.zeros(3)] * L, LAYOUT, plugins=build_plugins(env={"KVBM_PLUGINS": "host"}))


def test_importing_the_adapter_imports_no_torch() -> None:
    code = "import sys, kvbm, kvbm.engine_blocks; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_adapter_imports_no_plugin_package() -> None:
    root = Path(__file__).resolve().parents[1] / "kvbm"
    sources = [*sorted((root / "engine_blocks").glob("*.py")), root / "layout.py"]
    for path in sources:
        text = path.read_text()
        assert "import kvbm_" not in text and "from kvbm_" not in text, path
