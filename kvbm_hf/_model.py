"""What kvbm reads of a transformers model: its KV shape and dtype, and whether it can reuse KV."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

from kvbm.errors import LayoutError, TokenError
from kvbm.layout import BlockLayout, ModelSpec


def text_config(config: Any) -> Any:
    """The decoder's text config of a (possibly multimodal) model config."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def config_of(model_or_config: Any) -> Any:
    """The ``PretrainedConfig`` of a model, or the config itself."""
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
    cfg = config_of(model_or_config)
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
    cfg = text_config(config_of(model_or_config))
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = int(cfg.num_hidden_layers)
    dt = _dtype_name(dtype) if dtype is not None else _model_dtype(model_or_config)
    nm = name or getattr(config_of(model_or_config), "_name_or_path", "") or str(
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
    return kv_layers(model_or_config)[0]


def kv_layers(model_or_config: Any) -> tuple[str | None, int]:
    """``(unsupported_reason, layers)``: the layers a ``DynamicCache`` of this model holds
    (its decoder's, less shared ones), counted where the reason is None, else 0."""
    full = config_of(model_or_config)
    if getattr(full, "is_encoder_decoder", False):
        return "encoder-decoder models keep a cross-attention cache kvbm does not store", 0
    cfg = text_config(full)
    if getattr(cfg, "kv_lora_rank", None) or getattr(cfg, "v_head_dim", None) not in (
        None, getattr(cfg, "head_dim", None),
    ):
        return "latent attention (MLA) layers have keys and values of different sizes", 0
    try:
        layer_types, _ = get_layer_types_and_kwargs(cfg)
    except Exception as e:  # an unusual config: say so rather than guess
        return f"its layer types cannot be read ({e})", 0
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        return f"it has {', '.join(other)} layers; kvbm stores full-attention KV only", 0
    return None, len(layer_types)


def check_layout(spec: ModelSpec, layout: BlockLayout, what: str) -> None:
    """Raise ``LayoutError`` naming every field where the model's KV differs from ``layout``."""
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


def check_vocab(tokenizer: Any, vocab_size: int) -> None:
    """Raise ``TokenError`` if ``tokenizer`` has ids the model's embedding cannot hold."""
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


class ConfigFacts:
    """What ``KvbmCache`` reads of a model's config, read once per model (or config).

    A transformers config's attribute reads are slow (each goes through its
    ``__getattribute__``), and right after a forward every read runs in cold caches:
    ``kv_layers`` and ``model_spec`` took 0.4–1.5 ms on the request path of each request.
    A model's architecture is fixed once it is built, so these are read on its first
    cache and kept; the dtype is read from the model every time (``model.half()``
    changes it), and the manager's layout is checked every time.
    """

    __slots__ = ("config", "reason", "num_layers", "vocab_size", "kv_heads", "head_dim",
                 "name", "kind", "_dtype_of", "_device_of")

    def __init__(self, model_or_config: Any) -> None:
        config = config_of(model_or_config)
        self.config = config
        self.reason, self.num_layers = kv_layers(config)
        text = text_config(config)
        self.vocab_size = int(getattr(text, "vocab_size", 0) or getattr(config, "vocab_size", 0))
        self.kind = type(config).__name__.removesuffix("Config")
        self.kv_heads = self.head_dim = 0
        self.name = ""
        if self.reason is None:
            s = model_spec(model_or_config, dtype="float32")  # the dtype is read per use
            self.num_layers, self.kv_heads, self.head_dim, self.name = (
                s.num_layers, s.num_kv_heads, s.head_dim, s.name)
        # transformers' ``model.dtype`` and ``model.device`` walk the module tree to the
        # first (floating-point) parameter on every read: the parameters they found are
        # kept (weakly) and read instead. ``model.to()``/``half()`` change a parameter in
        # place (``param.data``), so its dtype and device stay the model's.
        self._dtype_of: weakref.ref[torch.Tensor] | None = None
        self._device_of: weakref.ref[torch.Tensor] | None = None
        if isinstance(model_or_config, torch.nn.Module):
            first = next(iter(model_or_config.parameters()), None)
            flt = next((p for p in model_or_config.parameters() if p.is_floating_point()), None)
            if first is not None and getattr(model_or_config, "device", None) == first.device:
                self._device_of = weakref.ref(first)
            if flt is not None and getattr(model_or_config, "dtype", None) == flt.dtype:
                self._dtype_of = weakref.ref(flt)

    def device(self, model_or_config: Any) -> Any:
        """``model.device`` (None for a config or a model without one)."""
        p = self._device_of() if self._device_of is not None else None
        if p is not None:
            return p.device
        if isinstance(model_or_config, PretrainedConfig):
            return None
        return getattr(model_or_config, "device", None)

    def spec(self, model_or_config: Any, dtype: Any = None) -> ModelSpec:
        """``model_spec(model_or_config, dtype)`` from the facts read once."""
        p = self._dtype_of() if self._dtype_of is not None else None
        dt = (_dtype_name(dtype) if dtype is not None else _dtype_name(p.dtype) if p is not None
              else _model_dtype(model_or_config))
        return ModelSpec(num_layers=self.num_layers, num_kv_heads=self.kv_heads,
                         head_dim=self.head_dim, dtype=dt, outer_dim=2, name=self.name)


_facts: dict[int, tuple[weakref.ref[Any], ConfigFacts]] = {}
_facts_lock = threading.Lock()


def config_facts(model_or_config: Any) -> ConfigFacts:
    """``ConfigFacts`` of ``model_or_config``, read on its first use and kept while it lives."""
    key = id(model_or_config)
    hit = _facts.get(key)
    if hit is not None and hit[0]() is model_or_config:
        return hit[1]
    facts = ConfigFacts(model_or_config)
    try:
        ref = weakref.ref(model_or_config)
    except TypeError:  # an object without weak references: read every time
        return facts
    with _facts_lock:
        for k in [k for k, (r, _) in _facts.items() if r() is None]:
            del _facts[k]
        _facts[key] = (ref, facts)
    return facts
