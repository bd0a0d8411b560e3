"""``KvbmLayer``: a transformers ``DynamicLayer`` that starts from loaded KV.

Its keys and values may still be being copied in when the model starts (a load fills
a CPU room layer by layer, ``kvbm_hf._fill``): every read of them waits for this
layer's copy first, so the model never reads a layer before its KV is in place.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from ._fill import LayerFill


class KvbmLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` that can start from loaded KV and append into reserved room.

    After ``preload`` the layer's keys and values are the first ``n`` tokens of a
    longer tensor (after ``reserve``, none yet); ``update`` writes new tokens after
    them in place instead of concatenating, while they fit. Anything else (no room left, a reordered or resized
    batch, autograd) falls back to ``DynamicLayer``'s concatenation, which drops the room.
    Tokens already handed out are never written, so earlier views stay valid.
    """

    #: The load still copying this layer's KV, and this layer's number in it: every
    #: read of ``keys`` or ``values`` waits for that copy first (``LayerFill.wait``).
    _fill: tuple[LayerFill, int] | None = None
    _k: torch.Tensor | None = None
    _v: torch.Tensor | None = None
    #: Held tokens not yet viewed (``_hold_room``): the key and value rooms and the
    #: count; ``keys`` and ``values`` are their first tokens, made on first read. The
    #: model's first ``update`` reads neither: it appends after them and views the
    #: whole run once, so a load makes no per-layer view on the request path.
    _lazy: tuple[torch.Tensor, torch.Tensor, int] | None = None
    #: What keeps a pooled room busy while this layer may still read or write it (the
    #: cache's hold, an alias counted in the storage's use count): the room's views
    #: are the pool's, shared, and count for nothing.
    _keep: object = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None

    def _await_fill(self) -> None:
        f = self._fill
        if f is not None:
            f[0].wait(f[1])
            self._fill = None

    def _view(self) -> None:
        """Make the held tokens' views (``_lazy``) now."""
        lz = self._lazy
        if lz is not None:
            self._lazy = None
            self._k, self._v = lz[0][:, :, : lz[2]], lz[1][:, :, : lz[2]]

    @property
    def keys(self) -> torch.Tensor | None:
        """This layer's keys, once its loaded KV is in place."""
        if self._fill is not None:
            self._await_fill()
        if self._lazy is not None:
            self._view()
        return self._k

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        if self._lazy is not None:  # ``values`` stays the held tokens' until set
            self._view()
        self._k = t

    @property
    def values(self) -> torch.Tensor | None:
        """This layer's values, once its loaded KV is in place."""
        if self._fill is not None:
            self._await_fill()
        if self._lazy is not None:
            self._view()
        return self._v

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        if self._lazy is not None:
            self._view()
        self._v = t

    def get_seq_length(self) -> int:
        """The tokens held (their count needs no wait for their copy)."""
        lz = self._lazy
        if lz is not None:
            return lz[2] if self.is_initialized else 0
        k = self._k
        if not self.is_initialized or k is None or k.numel() == 0:
            return 0
        return int(k.shape[-2])

    def preload(self, keys_room: torch.Tensor, values_room: torch.Tensor,
                keys: torch.Tensor | int, values: torch.Tensor | None = None) -> None:
        """Hold loaded tokens at the start of the given room tensors.

        ``keys``/``values`` are the loaded tokens' views of the rooms (their first
        tokens), or ``keys`` is their count and the views are made here.
        """
        if isinstance(keys, int):
            keys, values = keys_room[:, :, :keys], values_room[:, :, :keys]
        if values is None or keys.data_ptr() != keys_room.data_ptr() \
                or values.data_ptr() != values_room.data_ptr():
            raise ValueError("preload: keys and values must be the first tokens of the rooms")
        self._hold((keys_room, values_room), (keys, values))

    def _hold(self, room: tuple[torch.Tensor, torch.Tensor],
              held: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype | None = None,
              device: torch.device | None = None) -> None:
        """``preload`` without its checks: ``held`` are the first tokens of ``room``
        (whose dtype and device are ``dtype`` and ``device`` when given)."""
        # What ``lazy_initialization`` sets, without its two throw-away empty tensors.
        self.dtype = room[0].dtype if dtype is None else dtype
        self.device = room[0].device if device is None else device
        self.is_initialized = True
        self._room = room
        self._lazy = None
        self.keys, self.values = held

    def _hold_room(self, room: tuple[torch.Tensor, torch.Tensor], tokens: int,
                   dtype: torch.dtype, device: torch.device, keep: object) -> None:
        """``_hold`` of the first ``tokens`` (> 0) tokens of ``room`` (whose dtype and
        device are ``dtype`` and ``device``), their views made when first read; ``keep``
        (``_keep``) held meanwhile."""
        self._keep = keep
        self.dtype, self.device = dtype, device
        self.is_initialized = True
        self._room = room
        self._k = self._v = None
        self._lazy = (room[0], room[1], tokens)

    def reserve(self, keys_room: torch.Tensor, values_room: torch.Tensor) -> None:
        """Write the first tokens the model computes at the start of the given room tensors."""
        self._room = (keys_room, values_room)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' KV in place while the room holds them, else concatenate."""
        room = self._room
        if room is not None:
            rk, rv = room
            lz = self._lazy
            if lz is not None and lz[0] is rk:  # the held tokens, not viewed yet
                if self._fill is not None:  # the returned views are read at once
                    self._await_fill()
                cur, at_start = lz[2], True
            elif not self.is_initialized:  # reserved: nothing written yet
                self.lazy_initialization(key_states, value_states)
                cur, at_start = 0, True
            elif self.keys is not None and self.values is not None:
                cur = self.keys.shape[-2]
                # Still a prefix of the room (crop keeps it; batch reorders copy it away).
                at_start = (self.keys.data_ptr() == rk.data_ptr()
                            and self.values.data_ptr() == rv.data_ptr())
            else:
                cur, at_start = 0, False
            end = cur + key_states.shape[-2]
            if (
                at_start
                and end <= rk.shape[-2]
                and key_states.shape[0] == rk.shape[0]
                and key_states.dtype == rk.dtype and key_states.device == rk.device
                and not key_states.requires_grad
                and (torch.is_inference_mode_enabled() or not torch.is_inference(rk))
            ):
                rk[:, :, cur:end].copy_(key_states)
                rv[:, :, cur:end].copy_(value_states)
                self._lazy = None
                k, v = self._k, self._v = rk[:, :, :end], rv[:, :, :end]
                return k, v
            self._room = None
        return super().update(key_states, value_states, *args, **kwargs)

    def reset(self) -> None:
        """Forget the KV and the room (a load still copying finishes on its own)."""
        self._room = None
        self._fill = None
        self._lazy = None
        self._keep = None
        super().reset()
