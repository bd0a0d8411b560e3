"""Every engine arrangement of KV tensors kvbm accepts, checked and viewed as blocks.

Each form is viewed, without copying, as one tensor per layer whose dim 0 counts the
engine's (manager) blocks and whose other dims are one block's layer slice in kvbm's
canonical order: ``[num_blocks, outer, page, heads, head_dim]``, or ``[num_blocks,
outer, ratio, tokens, heads, head_dim]`` where vLLM splits a block into ``ratio``
kernel blocks whose strides do not let the two token dims merge (the bytes, read in
C order, are the same either way: token ``r * tokens + n``).

Forms (``form=`` names them; ``None`` detects by the number of dims):

* ``vllm`` — vLLM before 0.33, one tensor per layer: ``[2, num_blocks, page, heads,
  head_dim]`` (FlashAttention) or ``[num_blocks, 2, …]`` (FlashInfer; ``engine`` is
  then ``vllm[blocks-first]``), any stride order with ``head_dim`` innermost;
* ``vllm-bhnc`` — vLLM 0.33's logical ``[num_blocks * ratio, heads, tokens, C]`` per
  layer, ``C = outer × head_dim`` (K then V of one token), any stride order with C
  innermost; ``ratio = page / tokens`` kernel blocks per manager block;
* ``vllm-cpu`` — the same 4-dim shape read as vLLM's CPU attention reads it: memory
  ``[num_blocks, heads, outer, page, head_dim]`` (contiguous); only when asked for;
* ``mla`` — ``[num_blocks, page, head_dim]`` per layer (outer dim 1, one head);
* pools (``parse_pool``) — one tensor for all layers, TensorRT-LLM's
  ``[num_blocks, num_layers, kv_factor, page × heads × head_dim]`` in NHD or HND order
  inside a block, and kvbm's own pool (NHD).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError, LayoutError
from ..layout import BlockLayout

KvLayout = Literal["NHD", "HND"]
#: What ``form=`` accepts (``None`` detects the form from the number of dims).
FORMS = ("vllm", "vllm-bhnc", "vllm-cpu", "mla")
_SHAPES = {
    "vllm": "[outer, blocks, page, heads, head_dim]",
    "vllm[blocks-first]": "[blocks, outer, page, heads, head_dim]",
    "vllm-bhnc": "[blocks*ratio, heads, tokens, outer*head_dim]",
    "vllm-cpu": "[blocks, heads, page, outer*head_dim]",
    "mla": "[blocks, page, head_dim]",
}


def import_torch() -> Any:
    """torch, or a LayoutError with the pip command that installs it."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise LayoutError("engine KV tensors need torch: pip install 'kvbm[torch]'") from e
    return torch


def resolve_device(device: Any) -> Any:
    """A ``torch.device`` for ``'auto'`` (cuda when present, else cpu), ``'cpu'``, ``'cuda:N'``."""
    torch = import_torch()
    if isinstance(device, torch.device):
        dev = device
    elif device in (None, "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(device))
        except RuntimeError:
            raise ConfigError(
                f"device: value {device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
            ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: value {str(device)!r} needs CUDA, which is not available here; "
                "use device: auto (CPU memory without CUDA) or device: cpu"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ConfigError(f"device: value {str(device)!r}: only cpu and cuda devices are supported")
    return dev


@dataclass
class EngineViews:
    """An engine's tensors viewed as blocks: what an adapter is built from."""

    #: Per layer ``[num_blocks, *inner]``, ``inner`` in canonical order.
    layers: list[Any]
    #: The form found: vllm, vllm[blocks-first], vllm-bhnc, vllm-cpu, mla, trtllm, own.
    engine: str
    names: list[str]
    block_dim: int | None = None
    #: ``[num_blocks, num_layers, *inner]`` over every layer at once, when the layers are
    #: one allocation at a constant distance (a pool, vLLM's cross-layer caches).
    stacked: Any = None
    #: ``stacked`` when each of its blocks is one contiguous region (a block is one copy).
    pool: Any = None
    #: The pool's bytes when kvbm allocated it (a ``uint8`` tensor).
    raw: Any = None


def shape_of(t: Any) -> list[int]:
    """A tensor's shape as a list of ints (for messages and comparisons)."""
    return [int(s) for s in t.shape]


def non_overlapping(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether no two elements of a strided view share memory (no broadcast, no aliasing)."""
    dims = sorted((st, sz) for sz, st in zip(shape, strides) if sz > 1)
    need = 1
    for st, sz in dims:
        if st < need:
            return False
        need = st * sz
    return True


def split_tensors(kv_caches: Any) -> tuple[list[Any], list[str] | None]:
    """vLLM's ``dict[name, tensor]`` or a list, as (tensors, names or None)."""
    if isinstance(kv_caches, Mapping):
        return list(kv_caches.values()), [str(k) for k in kv_caches]
    if isinstance(kv_caches, Sequence) and not isinstance(kv_caches, (str, bytes)):
        return list(kv_caches), None
    raise LayoutError(
        f"kv_caches: expected a dict or list of per-layer tensors or one pool tensor, "
        f"got {type(kv_caches).__name__}"
    )


def _check_strides(t: Any, what: str, innermost: str) -> None:
    strides = list(t.stride())
    if t.shape[-1] > 1 and strides[-1] != 1:
        raise LayoutError(
            f"{what}: expected {innermost} (the last dim) to have stride 1, got strides "
            f"{strides}; pass the engine's tensor, not a transposed view"
        )
    if not non_overlapping(shape_of(t), strides):
        raise LayoutError(
            f"{what}: expected a tensor whose elements do not overlap, got shape "
            f"{shape_of(t)} with strides {strides} (an expanded or aliased view)"
        )


def _detect_block_dim(t: Any, layout: BlockLayout, what: str, forced: int | None) -> int:
    m = layout.model
    if t.dim() != 5:
        raise LayoutError(
            f"{what}: expected 5 dims [outer={m.outer_dim}, blocks, page, heads, head_dim] or "
            f"[blocks, outer={m.outer_dim}, page, heads, head_dim]"
            + (" (or MLA's 3 dims [blocks, page, head_dim])" if m.outer_dim == 1 else "")
            + f", got shape {shape_of(t)}"
        )
    tail = [layout.page_size, m.num_kv_heads, m.head_dim]
    if shape_of(t)[2:] != tail:
        raise LayoutError(
            f"{what}: expected trailing dims [page={layout.page_size}, heads={m.num_kv_heads}, "
            f"head_dim={m.head_dim}], got {shape_of(t)[2:]}"
        )
    if forced is not None:
        if forced not in (0, 1):
            raise LayoutError(f"block_dim: expected 0 or 1, got {forced!r}")
        if t.shape[1 - forced] != m.outer_dim:
            raise LayoutError(
                f"{what}: block_dim={forced} needs dim {1 - forced} to be outer_dim="
                f"{m.outer_dim}, got shape {shape_of(t)}"
            )
        return forced
    d0, d1 = int(t.shape[0]), int(t.shape[1])
    if d0 == m.outer_dim and d1 == m.outer_dim:
        raise LayoutError(
            f"{what}: shape {shape_of(t)} is ambiguous: both dim 0 and dim 1 equal "
            f"outer_dim={m.outer_dim}; pass block_dim=1 for vLLM's [2, blocks, …] or "
            "block_dim=0 for [blocks, 2, …]"
        )
    if d0 == m.outer_dim:
        return 1
    if d1 == m.outer_dim:
        return 0
    raise LayoutError(
        f"{what}: expected dim 0 or dim 1 to be outer_dim={m.outer_dim} (K and V), "
        f"got shape {shape_of(t)}"
    )


def _bhnc_shape(t: Any, layout: BlockLayout, what: str, num_blocks: int | None) -> tuple[int, int]:
    """(num_blocks, ratio) of a vLLM 0.33 ``[B*ratio, H, N, C]`` tensor, checked."""
    m = layout.model
    page = layout.page_size
    b, h, n, c = shape_of(t)
    if h != m.num_kv_heads or c != m.outer_dim * m.head_dim or n <= 0 or page % n:
        raise LayoutError(
            f"{what}: expected shape [blocks*ratio, heads={m.num_kv_heads}, tokens, "
            f"outer*head_dim={m.outer_dim * m.head_dim}] with tokens dividing page={page}, "
            f"got {[b, h, n, c]}; check model.num_kv_heads, head_dim and page_size"
        )
    ratio = page // n
    if num_blocks is not None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise LayoutError(f"num_blocks: expected a positive integer, got {num_blocks!r}")
        if b != num_blocks * ratio:
            raise LayoutError(
                f"{what}: expected {num_blocks} blocks x {ratio} kernel blocks of {n} tokens "
                f"(page={page}) = {num_blocks * ratio} on dim 0, got {b}; pass the engine's "
                "num_blocks and the manager's page_size"
            )
    elif b % ratio:
        raise LayoutError(
            f"{what}: {b} kernel blocks of {n} tokens do not make whole blocks of "
            f"page={page} tokens ({ratio} per block)"
        )
    return b // ratio, ratio


def _bhnc_view(t: Any, layout: BlockLayout, nb: int, ratio: int) -> Any:
    """``[nb, outer, ratio, tokens, heads, head_dim]`` over a ``[B*ratio, H, N, C]`` tensor."""
    m = layout.model
    v = t.unflatten(0, (nb, ratio)).unflatten(-1, (m.outer_dim, m.head_dim))
    # [nb, r, H, N, outer, hd] -> [nb, outer, r, N, H, hd]: K|V first, then tokens.
    return v.permute(0, 4, 1, 3, 2, 5)


def _merge_tokens(views: list[Any], layout: BlockLayout) -> list[Any]:
    """Merge ``[ratio, tokens]`` into ``page`` where every layer's strides allow it."""
    m = layout.model
    shape = (int(views[0].shape[0]), m.outer_dim, layout.page_size, m.num_kv_heads, m.head_dim)
    try:
        # A merged view costs numpy one loop level less per copy; all or none, so
        # every layer keeps the same block shape.
        return [v.view(shape) for v in views]
    except RuntimeError:
        return views


def parse_layers(
    tensors: Sequence[Any],
    layout: BlockLayout,
    *,
    names: Sequence[str] | None = None,
    block_dim: int | None = None,
    num_blocks: int | None = None,
    form: str | None = None,
    device: Any = None,
) -> EngineViews:
    """Check per-layer tensors against ``layout`` and view them as blocks (no copy)."""
    torch = import_torch()
    m = layout.model
    if form is not None and form not in FORMS:
        raise LayoutError(f"form: expected one of {', '.join(FORMS)} or None, got {form!r}")
    names = [str(n) for n in names] if names is not None else [str(i) for i in range(len(tensors))]
    if len(tensors) != m.num_layers:
        raise LayoutError(
            f"kv_caches: expected {m.num_layers} layer tensors, got {len(tensors)} "
            f"(model.num_layers is {m.num_layers})"
        )
    if len(names) != len(tensors):
        raise LayoutError(f"names: expected {len(tensors)} layer names, got {len(names)}")
    want_dtype = getattr(torch, m.dtype)
    want_device = resolve_device(device) if device is not None else None
    page, heads, hd, outer = layout.page_size, m.num_kv_heads, m.head_dim, m.outer_dim
    views: list[Any] = []
    want_shape: list[int] | None = None
    engine = ""
    nb = ratio = 0
    for li, t in enumerate(tensors):
        what = f"kv_caches[{names[li]!r}]"
        if not isinstance(t, torch.Tensor):
            raise LayoutError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != want_dtype:
            raise LayoutError(
                f"{what}: expected dtype {want_dtype} (model.dtype {m.dtype!r}), got {t.dtype}"
            )
        if want_device is None:
            want_device = t.device
        if t.device != want_device:
            raise LayoutError(
                f"{what}: expected device {want_device} (as the other layers), got {t.device}"
            )
        if want_shape is None:
            engine = _form_of(t, layout, what, form)
            if engine == "mla":
                if heads != 1:
                    raise LayoutError(
                        f"{what}: a 3-dim MLA tensor [blocks, page, head_dim] holds one head, "
                        f"but model.num_kv_heads is {heads}; set num_kv_heads: 1 for MLA"
                    )
                want_shape = [int(t.shape[0]), page, hd]
            elif engine == "vllm-cpu":
                want_shape = [int(t.shape[0]), heads, page, outer * hd]
            elif engine == "vllm-bhnc":
                nb, ratio = _bhnc_shape(t, layout, what, num_blocks)
                want_shape = shape_of(t)
            else:
                block_dim = _detect_block_dim(t, layout, what, block_dim)
                engine = "vllm" if block_dim == 1 else "vllm[blocks-first]"
                want_shape = [outer, page, heads, hd]
                want_shape.insert(block_dim, int(t.shape[block_dim]))
        if shape_of(t) != want_shape:
            raise LayoutError(
                f"{what}: expected shape {want_shape} {_SHAPES[engine]}, got {shape_of(t)}"
            )
        _check_strides(t, what, "the K|V dim C" if engine == "vllm-bhnc" else "head_dim")
        if engine == "mla":
            views.append(t.unsqueeze(1).unsqueeze(3))
        elif engine == "vllm-cpu":
            if not t.is_contiguous():
                raise LayoutError(
                    f"{what}: expected a contiguous tensor (vLLM's CPU cache is one "
                    f"allocation per layer), got strides {list(t.stride())}"
                )
            views.append(t.view(want_shape[0], heads, outer, page, hd).permute(0, 2, 3, 1, 4))
        elif engine == "vllm-bhnc":
            views.append(_bhnc_view(t, layout, nb, ratio))
        else:
            views.append(t.transpose(0, 1) if block_dim == 1 else t)
    if engine == "vllm-bhnc":
        views = _merge_tokens(views, layout)
    if int(views[0].shape[0]) == 0:
        raise LayoutError("kv_caches: expected at least one block, got num_blocks=0")
    if num_blocks is not None and int(views[0].shape[0]) != num_blocks:
        raise LayoutError(
            f"kv_caches: the tensors hold {int(views[0].shape[0])} blocks, "
            f"expected num_blocks={num_blocks}"
        )
    stacked = stack_layers(views)
    pool = stacked if stacked is not None and stacked[0].is_contiguous() else None
    return EngineViews(views, engine, names, block_dim if engine.startswith("vllm") else None,
                       stacked=stacked, pool=pool)


def _form_of(t: Any, layout: BlockLayout, what: str, form: str | None) -> str:
    dims = {"vllm": 5, "vllm-bhnc": 4, "vllm-cpu": 4, "mla": 3}
    if form is not None:
        if t.dim() != dims[form]:
            raise LayoutError(
                f"{what}: form {form!r} expects {dims[form]} dims {_SHAPES[form]}, "
                f"got shape {shape_of(t)}"
            )
        return form
    if t.dim() == 3 and layout.model.outer_dim == 1:
        return "mla"
    if t.dim() == 4:
        # What vLLM 0.33 hands every attention backend and connector.
        return "vllm-bhnc"
    return "vllm"


def stack_layers(views: list[Any]) -> Any:
    """One ``[num_blocks, num_layers, *inner]`` view over layers that are one allocation.

    vLLM 0.33 carves all layers out of one buffer at a constant distance; then a block
    of every layer is one strided view, and one copy call moves the whole block
    instead of one call per layer. None when the layers are separate allocations.
    """
    t0 = views[0]
    if t0.device.type == "meta":
        return None
    if len(views) == 1:
        return t0.unsqueeze(1)
    storage = t0.untyped_storage().data_ptr()
    step = views[1].storage_offset() - t0.storage_offset()
    if step <= 0:
        return None
    for i, v in enumerate(views):
        if (v.shape != t0.shape or v.stride() != t0.stride()
                or v.untyped_storage().data_ptr() != storage
                or v.storage_offset() != t0.storage_offset() + i * step):
            return None
    size = (int(t0.shape[0]), len(views), *shape_of(t0)[1:])
    stride = (t0.stride(0), step, *t0.stride()[1:])
    if not non_overlapping(size, stride):
        return None
    return t0.as_strided(size, stride, t0.storage_offset())


def parse_pool(
    pool: Any,
    layout: BlockLayout,
    *,
    kv_layout: KvLayout = "NHD",
    device: Any = None,
    engine: str = "trtllm",
) -> EngineViews:
    """Check one tensor for all layers (TensorRT-LLM's pool, kvbm's own) and view it as blocks."""
    torch = import_torch()
    m = layout.model
    what = "kv_cache pool"
    if not isinstance(pool, torch.Tensor):
        raise LayoutError(f"{what}: expected a torch.Tensor, got {type(pool).__name__}")
    want_dtype = getattr(torch, m.dtype)
    if pool.dtype != want_dtype:
        raise LayoutError(
            f"{what}: expected dtype {want_dtype} (model.dtype {m.dtype!r}), got {pool.dtype}; "
            "an fp8 pool held as uint8 can be passed as pool.view(torch.float8_e4m3fn)"
        )
    if device is not None and pool.device != resolve_device(device):
        raise LayoutError(f"{what}: expected device {resolve_device(device)}, got {pool.device}")
    if kv_layout not in ("NHD", "HND"):
        raise LayoutError(f"kv_layout: expected 'NHD' or 'HND', got {kv_layout!r}")
    page, heads, hd = layout.page_size, m.num_kv_heads, m.head_dim
    inner = (heads, page, hd) if kv_layout == "HND" else (page, heads, hd)
    nb = int(pool.shape[0]) if pool.dim() > 0 else 0
    head = [nb, m.num_layers, m.outer_dim]
    accepted = [head + [page * heads * hd], head + list(inner)]
    if kv_layout == "NHD":
        accepted.append(head + [page, heads * hd])
    if shape_of(pool) not in accepted:
        raise LayoutError(
            f"{what}: expected shape [blocks, num_layers={m.num_layers}, "
            f"outer={m.outer_dim}, page*heads*head_dim={page * heads * hd}] or "
            f"{accepted[1]} ({kv_layout}), got {shape_of(pool)}"
        )
    if nb == 0:
        raise LayoutError(f"{what}: expected at least one block, got shape {shape_of(pool)}")
    if not pool.is_contiguous():
        raise LayoutError(
            f"{what}: expected a contiguous tensor (the pool is one allocation), got strides "
            f"{list(pool.stride())} for shape {shape_of(pool)}"
        )
    v = pool.view(*head, *inner)
    if kv_layout == "HND":
        v = v.permute(0, 1, 2, 4, 3, 5)
    layers = [v[:, li] for li in range(m.num_layers)]
    # NHD inside a block is kvbm's own order: a block is one contiguous region.
    return EngineViews(layers, engine, [str(i) for i in range(m.num_layers)], stacked=v,
                       pool=v if kv_layout == "NHD" else None)


def allocate_pool(layout: BlockLayout, num_blocks: int, device: Any = "auto") -> EngineViews:
    """A zeroed pool of kvbm's own, NHD: ``[num_blocks, num_layers, outer, page*heads*hd]``."""
    from ..layout import aligned_empty

    torch = import_torch()
    if not isinstance(num_blocks, int) or num_blocks <= 0:
        raise LayoutError(f"num_blocks: expected a positive integer, got {num_blocks!r}")
    dev = resolve_device(device)
    nbytes = num_blocks * layout.bytes_per_block
    if dev.type == "cuda":
        raw = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
    else:
        # Page-aligned and zero-filled by the kernel; torch shares the memory.
        raw = torch.from_numpy(aligned_empty(nbytes))
    m = layout.model
    typed = raw.view(getattr(torch, m.dtype)).view(
        num_blocks, m.num_layers, m.outer_dim, layout.page_size * m.inner_dim
    )
    views = parse_pool(typed, layout, engine="own")
    views.raw = raw
    return views


def layer_run_bytes(views: Sequence[Any], itemsize: int) -> int:
    """The smallest contiguous run (bytes) one block's slice of a layer splits into."""
    return min(math.prod(shape_of(t[0])[d:]) * itemsize for t, d in
               ((t, run_depth(t[0])) for t in views))


def run_depth(block_view: Any) -> int:
    """How many leading dims of one block's layer slice to split it along for contiguous runs."""
    shape = shape_of(block_view)
    strides = list(block_view.stride())
    expect = 1
    depth = len(shape)
    for d in range(len(shape) - 1, -1, -1):
        if shape[d] != 1 and strides[d] != expect:
            break
        expect *= shape[d]
        depth = d
    return depth
