"""Layout and connector registration through their hook specs."""

from __future__ import annotations

import types
from typing import Any

import pytest

from kvbm import PluginError, hookimpl
from kvbm.plugins import build_plugins


def make_plugin(**hooks: Any) -> types.ModuleType:
    mod = types.ModuleType("local_plugin")
    for name, fn in hooks.items():
        setattr(mod, name, hookimpl(fn))
    return mod


def test_kvbm_register_layouts_adds_a_layout() -> None:
    def kvbm_register_layouts(registry: Any) -> None:
        registry.add("paged", factory="kvbm.layout:ContiguousBlocks")

    plugins = build_plugins(extra_plugins=[make_plugin(kvbm_register_layouts=kvbm_register_layouts)])
    assert plugins.layouts.get("paged").load().__name__ == "ContiguousBlocks"


def test_kvbm_register_connectors_adds_a_connector() -> None:
    def kvbm_register_connectors(registry: Any) -> None:
        registry.add("myengine", factory="kvbm.manager:KvBlockManager")

    plugins = build_plugins(extra_plugins=[make_plugin(kvbm_register_connectors=kvbm_register_connectors)])
    assert plugins.connectors.get("myengine").plugin.name == "local_plugin"


def test_builtin_connectors_are_listed() -> None:
    assert {"hf", "vllm", "sglang"} <= set(build_plugins().connectors.names())


def test_a_name_taken_by_another_plugin_is_an_error_naming_both() -> None:
    def kvbm_register_layouts(registry: Any) -> None:
        registry.add("contiguous", factory="elsewhere:Thing")

    with pytest.raises(PluginError, match="'contiguous' is registered twice: by plugin 'builtin'"):
        build_plugins(extra_plugins=[make_plugin(kvbm_register_layouts=kvbm_register_layouts)])


def test_factory_that_does_not_exist_is_a_plugin_error_naming_it() -> None:
    def kvbm_register_layouts(registry: Any) -> None:
        registry.add("ghost", factory="kvbm.layout:Ghost")

    plugins = build_plugins(extra_plugins=[make_plugin(kvbm_register_layouts=kvbm_register_layouts)])
    with pytest.raises(PluginError, match="has no attribute 'Ghost'"):
        plugins.layouts.get("ghost").load()


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(PluginError, match="unknown layout 'nope'; known: contiguous"):
        build_plugins().layouts.get("nope")
