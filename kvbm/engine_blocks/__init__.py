"""One adapter for an engine's KV tensors: ``LayerSeparateBlocks``, and ``engine_blocks`` to pick it.

Every engine arrangement (vLLM's per-layer tensors of any version, MLA, TensorRT-LLM's
pool, a pool of kvbm's own) is read through ``LayerSeparateBlocks``. It copies whole
blocks or single layers between the engine's tensors and kvbm's contiguous block
buffers, on any device; ``engine_blocks`` returns it for CPU tensors and, for device
tensors, the accelerated subclass a plugin registered for that device (on CUDA:
copy streams, pinned staging, batched gathers).

A plugin offers an accelerated class for a device type by registering a layout named
``accelerated_layout_name(device_type)`` (``"engine_blocks:cuda"``) through
``kvbm_register_layouts``; its factory is called as ``LayerSeparateBlocks`` is.

torch is imported only when an adapter is built, so ``import kvbm`` stays light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import LayoutError
from ._forms import (
    FORMS,
    EngineViews,
    KvLayout,
    import_torch,
    non_overlapping,
    resolve_device,
    run_depth,
    shape_of,
)
from .adapter import LayerSeparateBlocks

if TYPE_CHECKING:
    from ..layout import BlockLayout
    from ..plugins import Plugins

# EngineViews, import_torch, run_depth and shape_of serve plugins' subclasses.
__all__ = [
    "FORMS",
    "EngineViews",
    "KvLayout",
    "LayerSeparateBlocks",
    "accelerated_layout_name",
    "engine_blocks",
    "import_torch",
    "non_overlapping",
    "resolve_device",
    "run_depth",
    "shape_of",
]


def accelerated_layout_name(device_type: str) -> str:
    """The layout-registry name under which a plugin offers its adapter for ``device_type``."""
    return f"engine_blocks:{device_type}"


def _device_type(kv_caches: Any) -> str:
    torch = import_torch()
    first = kv_caches
    if isinstance(kv_caches, Mapping):
        first = next(iter(kv_caches.values()), None)
    elif isinstance(kv_caches, Sequence) and not isinstance(kv_caches, (str, bytes)):
        first = kv_caches[0] if len(kv_caches) else None
    if not isinstance(first, torch.Tensor):
        raise LayoutError(
            f"kv_caches: expected torch tensors (a dict or list per layer, or one pool), "
            f"got {type(first).__name__}"
        )
    return str(first.device.type)


def engine_blocks(
    kv_caches: Any,
    layout: BlockLayout,
    *,
    num_blocks: int | None = None,
    names: Sequence[str] | None = None,
    plugins: Plugins | None = None,
    **options: Any,
) -> LayerSeparateBlocks:
    """The adapter for an engine's KV tensors: the core class, or a plugin's for a device.

    ``kv_caches`` is vLLM's ``dict[name, tensor]``, a list of per-layer tensors, or one
    pool tensor; ``num_blocks`` is the engine's block count (it gives vLLM 0.33's
    kernel blocks per block, and is checked); ``names`` names the layers of a list.
    CPU tensors get ``LayerSeparateBlocks``; tensors on another device get the class a
    plugin registered as ``accelerated_layout_name(device)``, or ``LayerSeparateBlocks``
    when no installed plugin offers one. ``plugins`` defaults to ``build_plugins()``;
    ``options`` (``block_dim``, ``form``, ``kv_layout``, ``device``, or the plugin's
    own keys) pass through. ``huge_pages`` (the ``engine_huge_pages`` setting, whose
    default is 'auto'; here the default is off) moves CPU tensors onto 2 MiB pages in
    place: 'auto' on a background thread (``_huge.HugePages``, the adapter's
    ``huge_pages``), True / 'on' before this returns (``_native.advise_huge_pages``); it
    is ignored for tensors on a device.
    """
    device_type = _device_type(kv_caches)
    factory: Any = LayerSeparateBlocks
    if device_type != "cpu":
        options.pop("huge_pages", None)  # device memory: not the host's page tables
        factory = _accelerated(device_type, plugins) or LayerSeparateBlocks
    return factory(kv_caches, layout, num_blocks=num_blocks, names=names, **options)  # type: ignore[no-any-return]


def _accelerated(device_type: str, plugins: Plugins | None) -> Any:
    """The factory a plugin registered for ``device_type``, or None when none is installed."""
    if plugins is None:
        from ..plugins import build_plugins

        plugins = build_plugins()
    name = accelerated_layout_name(device_type)
    if name not in plugins.layouts:
        return None
    entry = plugins.layouts.get(name)
    if not entry.available:
        # Registered but its packages are missing: the portable class still works.
        return None
    return entry.load()
