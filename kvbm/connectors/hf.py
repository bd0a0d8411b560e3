"""Hugging Face transformers connector: a ``DynamicCache`` that reuses cached prefixes.

A transformers causal-LM user adds kvbm with one call::

    manager = manager_for_model(model, tiers=[{"type": "host", "capacity": "8GiB"}])
    out = generate(model, input_ids, manager, max_new_tokens=64)

or, step by step, with the ``Cache`` class::

    cache = KvbmCache(manager, model)
    cache.load_prefix(input_ids)          # match + onboard the cached prefix
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
    cache.offload_blocks(out)             # store the new complete blocks

``load_prefix`` matches the prompt's complete blocks (``KvBlockManager.match_prefix``)
and onboards their KV straight into the tensors the model attends over; the model then
computes only the rest of the prompt, because transformers starts at
``cache.get_seq_length()``. At least the prompt's last token is always computed: the
model needs its logits to produce the first new token. ``offload_blocks`` gathers the cache's
complete blocks into kvbm's block layout and hands them to the manager.

transformers holds each layer's KV as ``[batch, kv_heads, seq, head_dim]`` tensors;
kvbm stores a block as ``(num_layers, 2, page_size, kv_heads * head_dim)``
(``BlockLayout.block_shape``). ``CacheBlockSource`` and ``CacheBlockDestination``
translate between the two.

What is not reused, and why, is said once in the log: a model with sliding-window,
chunked, linear (Mamba) or latent (MLA) attention layers, a batch of more than one
sequence, and a prompt without a complete block run as a plain ``DynamicCache``.
A model whose KV shape or dtype differs from the manager's layout, or a tokenizer
whose vocabulary the model's embedding cannot hold, is an error at construction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs

from ..errors import LayoutError, TokenError
from ..layout import BlockLayout, ModelSpec
from ..manager import KvBlockManager, OffloadResult

__all__ = [
    "CacheBlockSource",
    "KvbmCache",
    "CacheBlockDestination",
    "KvbmLayer",
    "generate",
    "manager_for_model",
    "model_spec",
    "prefill",
    "unsupported_reason",
]

log = logging.getLogger("kvbm.hf")

_said: set[str] = set()
_said_lock = threading.Lock()


def _say_once(key: str, msg: str, *args: Any, level: int = logging.WARNING) -> None:
    """Log a pass-through reason once per process: a serving loop would repeat it per request."""
    with _said_lock:
        if key in _said:
            return
        _said.add(key)
    log.log(level, msg, *args)


# -- the model's side -----------------------------------------------------------------


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def _config_of(model_or_config: Any) -> Any:
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    cfg = getattr(model_or_config, "config", None)
    if isinstance(cfg, PretrainedConfig):
        return cfg
    raise TypeError(
        f"expected a transformers model or its PretrainedConfig, got {type(model_or_config).__name__}"
    )


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _model_dtype(model_or_config: Any) -> str:
    """The dtype the model computes KV in: the model's own, else the config's, else float32."""
    dt = getattr(model_or_config, "dtype", None)
    if isinstance(dt, torch.dtype) and not isinstance(model_or_config, PretrainedConfig):
        return _dtype_name(dt)
    cfg = _config_of(model_or_config)
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dt, str) and dt != "auto":
        return dt
    if isinstance(dt, torch.dtype):
        return _dtype_name(dt)
    return "float32"


def model_spec(model_or_config: Any, dtype: Any = None, name: str | None = None) -> ModelSpec:
    """kvbm's ``ModelSpec`` of a transformers model: layers, KV heads, head size, dtype.

    ``dtype`` (a ``torch.dtype`` or its name) overrides the model's; ``name`` defaults
    to the config's ``_name_or_path`` or its ``model_type``.
    """
    cfg = _text_config(_config_of(model_or_config))
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = int(cfg.num_hidden_layers)
    dt = _dtype_name(dtype) if dtype is not None else _model_dtype(model_or_config)
    nm = name or getattr(_config_of(model_or_config), "_name_or_path", "") or str(
        getattr(cfg, "model_type", "model")
    )
    return ModelSpec(num_layers=layers, num_kv_heads=kv_heads, head_dim=int(head_dim),
                     dtype=dt, outer_dim=2, name=nm)


def unsupported_reason(model_or_config: Any) -> str | None:
    """Why kvbm cannot reuse this model's KV, or None when it can.

    kvbm stores full-attention K/V blocks. Layers that keep only a window (sliding,
    chunked), a recurrent state (Mamba, linear attention) or a compressed latent (MLA)
    hold something else, and reusing blocks for them would hand the model wrong KV.
    """
    full = _config_of(model_or_config)
    if getattr(full, "is_encoder_decoder", False):
        return "encoder-decoder models keep a cross-attention cache kvbm does not store"
    cfg = _text_config(full)
    if getattr(cfg, "kv_lora_rank", None) or getattr(cfg, "v_head_dim", None) not in (
        None, getattr(cfg, "head_dim", None),
    ):
        return "latent attention (MLA) layers have keys and values of different sizes"
    try:
        layer_types, _ = get_layer_types_and_kwargs(cfg)
    except Exception as e:  # an unusual config: say so rather than guess
        return f"its layer types cannot be read ({e})"
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        return f"it has {', '.join(other)} layers; kvbm stores full-attention KV only"
    return None


def manager_for_model(
    model_or_config: Any,
    tiers: list[dict[str, Any]] | None = None,
    *,
    page_size: int = 16,
    name: str | None = None,
    dtype: Any = None,
    **settings: Any,
) -> KvBlockManager:
    """A ``KvBlockManager`` whose model section is read from the transformers config.

    ``tiers`` is the chain (default: kvbm's, a 4GiB host tier); other keyword arguments
    are kvbm settings (``cache_salt``, ``write_through`` …). The model name, which is part
    of every block's namespace, defaults to the config's ``_name_or_path``: give models
    with different weights different names, or they would share blocks.
    """
    spec = model_spec(model_or_config, dtype=dtype, name=name)
    cfg: dict[str, Any] = {
        "model": {"name": spec.name, "num_layers": spec.num_layers,
                  "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                  "dtype": spec.dtype},
        "page_size": page_size,
        **settings,
    }
    if tiers is not None:
        cfg["tiers"] = tiers
    return KvBlockManager.from_config(cfg)


def _check_layout(spec: ModelSpec, layout: BlockLayout, what: str) -> None:
    m = layout.model
    diffs = [
        f"{k}: model {getattr(spec, k)!r}, kvbm {getattr(m, k)!r}"
        for k in ("num_layers", "num_kv_heads", "head_dim", "dtype", "outer_dim")
        if getattr(spec, k) != getattr(m, k)
    ]
    if diffs:
        raise LayoutError(
            f"{what}: the model's KV layout does not match kvbm's ({'; '.join(diffs)}); set "
            f"kvbm's model to {{num_layers: {spec.num_layers}, num_kv_heads: {spec.num_kv_heads}, "
            f"head_dim: {spec.head_dim}, dtype: {spec.dtype}}} or build the manager with "
            "kvbm.connectors.hf.manager_for_model(model)"
        )


def _check_vocab(tokenizer: Any, vocab_size: int) -> None:
    try:
        n = len(tokenizer)
    except TypeError:
        n = int(getattr(tokenizer, "vocab_size", 0) or 0)
    if n > vocab_size:
        raise TokenError(
            f"tokenizer: {type(tokenizer).__name__} has {n} tokens but the model's vocab_size "
            f"is {vocab_size}, so ids {vocab_size}..{n - 1} have no embedding; use the tokenizer "
            "saved with this model (or resize the model's embeddings to the tokenizer)"
        )


# -- block movers ---------------------------------------------------------------------


class CacheBlockSource:
    """A ``BlockSource`` over per-layer ``[1, kv_heads, seq, head_dim]`` key/value tensors.

    Block ``b`` is tokens ``b*page .. (b+1)*page``. ``copy_out`` gathers it from every
    layer into kvbm's ``(num_layers, 2, page, kv_heads*head_dim)`` block bytes.
    The tensors are held by reference: transformers' ``DynamicLayer`` replaces them on
    every update, and ``KvbmLayer`` writes only past the tokens it handed out, so a
    source stays valid while the model runs on (which is what lets
    ``KvbmCache.offload_blocks(wait=False)`` copy in the background).
    """

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], layout: BlockLayout,
                 batch_index: int = 0) -> None:
        m = layout.model
        if len(layers) != m.num_layers:
            raise LayoutError(f"cache: expected {m.num_layers} layers, got {len(layers)}")
        want = getattr(torch, m.dtype)
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for li, (k, v) in enumerate(layers):
            for what, t in (("keys", k), ("values", v)):
                if t.dim() != 4 or t.shape[1] != m.num_kv_heads or t.shape[3] != m.head_dim:
                    raise LayoutError(
                        f"cache layer {li} {what}: expected [batch, {m.num_kv_heads}, seq, "
                        f"{m.head_dim}], got {list(t.shape)}"
                    )
                if t.dtype != want:
                    raise LayoutError(f"cache layer {li} {what}: expected {m.dtype}, got {t.dtype}")
            self._kv.append((k[batch_index], v[batch_index]))
        self.num_tokens = min(min(k.shape[1], v.shape[1]) for k, v in self._kv)
        self.num_blocks = self.num_tokens // layout.page_size
        self.layout = layout
        self._dtype = want

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        with torch.inference_mode():
            self._copy_out(indices, dst)

    def _copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        m = self.layout.model
        p = self.layout.page_size
        for b, d in zip(indices, dst, strict=True):
            if not 0 <= b < self.num_blocks:
                raise LayoutError(f"block index {b} is out of range [0, {self.num_blocks})")
            out = torch.from_numpy(d).view(self._dtype).view(
                m.num_layers, 2, p, m.num_kv_heads, m.head_dim
            )
            s = b * p
            for li, (k, v) in enumerate(self._kv):
                # [heads, page, head_dim] -> [page, heads, head_dim]: one strided copy each.
                out[li, 0].copy_(k[:, s : s + p].transpose(0, 1))
                out[li, 1].copy_(v[:, s : s + p].transpose(0, 1))


class CacheBlockDestination:
    """A ``BlockDestination`` that writes onboarded blocks where the model will read them.

    It allocates every layer's keys and values in one tensor ``[L, 2, 1, capacity,
    kv_heads, head_dim]``, ``capacity`` tokens long: room for the loaded prefix, the
    rest of the prompt and some generated tokens. Token-major, like kvbm's block (and
    like the projections transformers computes K and V with), so ``copy_in`` lands a
    block with one copy of ``L × 2`` contiguous runs, and ``kv_room`` hands the model
    ``[1, kv_heads, capacity, head_dim]`` views of it (attention reads strided K/V at
    the same speed). ``KvbmLayer`` then appends the new tokens' KV into the remaining
    room, so the prefix's bytes are copied once, from the tier into place, where a plain
    ``DynamicCache`` would copy them again on every forward (``torch.cat``).
    """

    def __init__(self, layout: BlockLayout, num_blocks: int, capacity: int,
                 device: Any = "cpu") -> None:
        m = layout.model
        if capacity < num_blocks * layout.page_size:
            raise ValueError(f"capacity {capacity} tokens is less than {num_blocks} blocks")
        self.layout = layout
        self.num_blocks = num_blocks
        self._dtype = getattr(torch, m.dtype)
        self.room = torch.empty(
            (m.num_layers, 2, 1, capacity, m.num_kv_heads, m.head_dim),
            dtype=self._dtype, device=device,
        )

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        # The manager may call from its copy threads, where the caller's inference mode
        # (thread-local) is off; updating an inference tensor there would raise.
        with torch.inference_mode():
            self._copy_in(indices, src)

    def _copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        m = self.layout.model
        p = self.layout.page_size
        for b, s in zip(indices, src, strict=True):
            if not 0 <= b < self.num_blocks:
                raise LayoutError(f"block index {b} is out of range [0, {self.num_blocks})")
            blk = torch.from_numpy(s).view(self._dtype).view(
                m.num_layers, 2, p, m.num_kv_heads, m.head_dim
            )
            self.room[:, :, 0, b * p : (b + 1) * p].copy_(blk)

    def kv_room(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s key and value room as ``[1, kv_heads, capacity, head_dim]`` views."""
        return self.room[layer, 0].transpose(1, 2), self.room[layer, 1].transpose(1, 2)


class KvbmLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` that can start from loaded KV and append into reserved room.

    After ``preload`` the layer's keys and values are the first ``n`` tokens of a
    longer tensor; ``update`` writes new tokens after them in place instead of
    concatenating, while they fit. Anything else (no room left, a reordered or resized
    batch, autograd) falls back to ``DynamicLayer``'s concatenation, which drops the room.
    Tokens already handed out are never written, so earlier views stay valid.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None

    def preload(self, keys_room: torch.Tensor, values_room: torch.Tensor, num_tokens: int) -> None:
        """Hold ``num_tokens`` loaded tokens at the start of the given room tensors."""
        self.lazy_initialization(keys_room, values_room)
        self._room = (keys_room, values_room)
        self.keys = keys_room[:, :, :num_tokens]
        self.values = values_room[:, :, :num_tokens]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        room = self._room
        if room is not None and self.keys is not None and self.values is not None:
            rk, rv = room
            cur = self.keys.shape[-2]
            end = cur + key_states.shape[-2]
            if (
                end <= rk.shape[-2]
                and key_states.shape[0] == rk.shape[0]
                # Still a prefix of the room (crop keeps it; batch reorders copy it away).
                and self.keys.data_ptr() == rk.data_ptr()
                and self.values.data_ptr() == rv.data_ptr()
                and not key_states.requires_grad
                and (torch.is_inference_mode_enabled() or not torch.is_inference(rk))
            ):
                rk[:, :, cur:end].copy_(key_states)
                rv[:, :, cur:end].copy_(value_states)
                self.keys = rk[:, :, :end]
                self.values = rv[:, :, :end]
                return self.keys, self.values
            self._room = None
        return super().update(key_states, value_states, *args, **kwargs)

    def reset(self) -> None:
        self._room = None
        super().reset()


# -- the cache ------------------------------------------------------------------------


def _token_row(input_ids: Any) -> tuple[np.ndarray | None, int]:
    """The single sequence of ``input_ids`` as int64 numpy, and the batch size."""
    if isinstance(input_ids, torch.Tensor):
        t = input_ids.detach()
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise TokenError(f"input_ids: expected [batch, seq] token ids, got shape {list(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TokenError(f"input_ids: expected integer token ids, got {t.dtype}")
        if t.shape[0] != 1:
            return None, int(t.shape[0])
        return t[0].cpu().numpy().astype(np.int64, copy=False), 1
    arr = np.asarray(input_ids)
    if arr.ndim == 2:
        if arr.shape[0] != 1:
            return None, int(arr.shape[0])
        arr = arr[0]
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TokenError(f"input_ids: expected integer token ids, got {arr.dtype} {list(arr.shape)}")
    return arr.astype(np.int64, copy=False), 1


class KvbmCache(DynamicCache):
    """A transformers ``DynamicCache`` that loads cached prefixes from kvbm and stores new blocks.

    Use one per request (or conversation): ``load_prefix(input_ids)`` before the model
    runs, ``offload_blocks(sequence)`` after. The manager's model section must describe this
    model (``manager_for_model`` builds one that does); a mismatch raises
    ``LayoutError`` naming each differing field. ``tokenizer``, when given, is checked
    against the model's vocabulary. Models kvbm cannot serve (``unsupported_reason``)
    get a plain ``DynamicCache`` that never loads or stores, said once in the log.
    """

    def __init__(self, manager: KvBlockManager, model_or_config: Any, *,
                 tokenizer: Any = None, dtype: Any = None, headroom: int = 256) -> None:
        config = _config_of(model_or_config)
        super().__init__(config=config)
        self.headroom = headroom
        self.manager = manager
        self.layout = manager.layout
        self.page_size = manager.page_size
        text = _text_config(config)
        self.vocab_size = int(getattr(text, "vocab_size", 0) or getattr(config, "vocab_size", 0))
        if tokenizer is not None and self.vocab_size:
            _check_vocab(tokenizer, self.vocab_size)
        self.reason = unsupported_reason(config)
        self.spec: ModelSpec | None = None
        if self.reason is not None:
            _say_once(f"unsupported:{getattr(config, 'model_type', '?')}:{self.reason}",
                      "kvbm: %s is served without prefix reuse: %s",
                      type(config).__name__.removesuffix("Config") or "model", self.reason)
        else:
            # Full attention everywhere (checked above), so every layer is a plain
            # DynamicLayer; ours behaves the same and can also start from loaded KV.
            self.layers = [KvbmLayer() for _ in self.layers]
            self.spec = model_spec(model_or_config, dtype=dtype)
            _check_layout(self.spec, self.layout, type(config).__name__.removesuffix("Config"))
            if manager.settings.tp_size != 1:
                raise LayoutError(
                    f"tp_size: kvbm's manager is set for {manager.settings.tp_size} tensor-parallel "
                    "ranks, but a transformers model in one process holds every KV head; set "
                    "tp_size: 1 (the default)"
                )
        # Loaded KV goes where the model computes: a model's own device, else the CPU.
        dev = None if isinstance(model_or_config, PretrainedConfig) else getattr(
            model_or_config, "device", None)
        self.device = dev if isinstance(dev, torch.device) else torch.device("cpu")
        self.loaded_tokens = 0
        self.offered_blocks = 0

    @property
    def reuse_enabled(self) -> bool:
        """True when this model's KV can be loaded from and stored to kvbm."""
        return self.reason is None

    def _tokens(self, input_ids: Any, what: str) -> np.ndarray | None:
        if not self.reuse_enabled:
            return None
        row, batch = _token_row(input_ids)
        if row is None:
            _say_once("batch", "kvbm: %s with a batch of %d sequences runs without prefix reuse; "
                      "kvbm's transformers cache serves one sequence per cache", what, batch)
            return None
        if row.size and self.vocab_size and (row.min() < 0 or row.max() >= self.vocab_size):
            raise TokenError(
                f"input_ids: ids must lie in [0, {self.vocab_size}) for this model, got min "
                f"{int(row.min())} and max {int(row.max())}; was it tokenized with another "
                "model's tokenizer?"
            )
        return row

    def load_prefix(self, input_ids: Any) -> int:
        """Onboard the longest cached prefix of ``input_ids``; return the tokens now cached.

        Loads whole blocks only, and never the prompt's last token. Returns 0 (plain
        prefill) when nothing matches, when the prompt has no complete block before its
        last token, or when reuse is off for this model. A cache that already holds KV
        (a conversation continued in the same cache) is left as it is.
        """
        have = self.get_seq_length()
        if have:
            return have
        row = self._tokens(input_ids, "load_prefix")
        if row is None:
            return 0
        usable = (len(row) - 1) // self.page_size
        if usable <= 0:
            _say_once("short", "kvbm: prompts shorter than %d tokens (one block plus the last "
                      "token) have nothing to load; they run as plain prefill",
                      self.page_size + 1, level=logging.INFO)
            return 0
        hashes = self.manager.hash_tokens(row[: usable * self.page_size])
        with self.manager.match_prefix(hashes) as match:
            if match.num_blocks == 0:
                return 0
            # Room for the whole prompt and ``headroom`` generated tokens, so neither the
            # prefill nor the first decode steps copy the loaded prefix again.
            dest = CacheBlockDestination(self.layout, match.num_blocks,
                                         capacity=len(row) + max(self.headroom, 0),
                                         device=self.device)
            res = self.manager.onboard(match, dest)
        if res.loaded == 0:
            return 0
        for li, layer in enumerate(self.layers):
            if not isinstance(layer, KvbmLayer):  # pragma: no cover - guarded in __init__
                raise LayoutError(f"cache layer {li}: {type(layer).__name__} cannot take loaded KV")
            layer.preload(*dest.kv_room(li), res.loaded * self.page_size)
        self.loaded_tokens = res.loaded * self.page_size
        # Blocks just loaded are in kvbm already: offering them again would only inflate
        # the admission filters' reuse counts.
        self.offered_blocks = res.loaded
        return self.loaded_tokens

    def offload_blocks(
        self, input_ids: Any, *, wait: bool = True
    ) -> OffloadResult | Future[OffloadResult]:
        """Store the complete blocks of ``input_ids`` whose KV this cache holds and kvbm lacks.

        ``input_ids`` is the sequence the cache was filled with (the prompt, or the
        prompt and the generated tokens, as ``generate`` returns them); only blocks
        within both it and the cache are stored, each offered once per cache. With
        ``wait=False`` the copy runs on a background thread and a ``Future`` is returned.
        """
        row = self._tokens(input_ids, "offload")
        if row is None or not self.layers or not getattr(self.layers[0], "is_initialized", False):
            return _done(OffloadResult(), wait)
        layers = [(layer.keys, layer.values) for layer in self.layers]  # type: ignore[union-attr]
        source = CacheBlockSource(layers, self.layout)  # type: ignore[arg-type]
        n = min(len(row), source.num_tokens) // self.page_size
        start = self.offered_blocks
        if n <= start:
            return _done(OffloadResult(), wait)
        self.offered_blocks = n

        def run() -> OffloadResult:
            hashes = self.manager.hash_tokens(row[: n * self.page_size])
            return self.manager.offload(hashes[start:], source, indices=range(start, n))

        if wait:
            return run()
        pool = ThreadPoolExecutor(1, thread_name_prefix="kvbm-hf-offload")
        fut = pool.submit(run)
        pool.shutdown(wait=False)  # the thread exits once this one job is done
        return fut

    def reset(self) -> None:
        """Drop the cached KV and start a new request in this cache."""
        super().reset()  # type: ignore[no-untyped-call]
        self.loaded_tokens = 0
        self.offered_blocks = 0


def _done(res: OffloadResult, wait: bool) -> OffloadResult | Future[OffloadResult]:
    if wait:
        return res
    fut: Future[OffloadResult] = Future()
    fut.set_result(res)
    return fut


# -- one call -------------------------------------------------------------------------


def prefill(model: Any, input_ids: torch.Tensor, cache: KvbmCache, *, offload: bool = True,
            **forward_kwargs: Any) -> Any:
    """Run the prompt through ``model`` with ``cache``: load the cached prefix, compute the rest.

    Returns the model's output for the computed positions (``logits[:, -1]`` is the
    prompt's last token, as in a plain forward). With ``offload`` the prompt's new
    complete blocks are stored afterwards.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    n = cache.load_prefix(input_ids)
    out = model(input_ids=input_ids[:, n:], past_key_values=cache, use_cache=True, **forward_kwargs)
    if offload:
        cache.offload_blocks(input_ids)
    return out


def generate(model: Any, input_ids: torch.Tensor, manager: KvBlockManager, *,
             tokenizer: Any = None, **generate_kwargs: Any) -> Any:
    """``model.generate`` with kvbm: the cached prefix is loaded, the new blocks stored.

    Takes and returns what ``model.generate`` does (``generate_kwargs`` pass through).
    The KV of the prompt and of the generated tokens is offloaded, so the next turn of
    a conversation, whose prompt starts with this one's output, reuses all of it.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    cache = KvbmCache(manager, model, tokenizer=tokenizer)
    cache.load_prefix(input_ids)
    out = model.generate(input_ids, past_key_values=cache, **generate_kwargs)
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    cache.offload_blocks(seq)
    return out
