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
import os
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from kvbm.errors import LayoutError, TokenError
from kvbm.hashing import hashes_int64
from kvbm.layout import ModelSpec
from kvbm.manager import KvBlockManager, OffloadResult
from kvbm.match import Match

from ._blocks import CacheBlockDestination, CacheBlockSource, umax
from ._fill import LayerFill
from ._layer import KvbmLayer
from ._model import (
    check_layout,
    check_vocab,
    config_facts,
    model_spec,
    unsupported_reason,
)
from ._rooms import state_of

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


# -- the cache ------------------------------------------------------------------------


def _token_row(input_ids: Any) -> tuple[np.ndarray | None, int]:
    """The single sequence of ``input_ids`` as int64 numpy, and the batch size."""
    if isinstance(input_ids, torch.Tensor):
        # The common case with one torch call (each costs tens of microseconds in the
        # caches a forward just filled): the same memory as numpy, no copy. ``numpy()``
        # itself refuses what has no such view (a CUDA, meta or sparse tensor, one that
        # requires grad, bfloat16): those, and float or bool ids, take the checks below.
        try:
            arr = input_ids.numpy()
        except (TypeError, RuntimeError):
            arr = None
        if arr is not None and arr.dtype.kind in "iu" and 1 <= arr.ndim <= 2:
            if arr.ndim == 2:
                if arr.shape[0] != 1:
                    return None, int(arr.shape[0])
                arr = arr[0]
            return arr.astype(np.int64, copy=False), 1
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

    #: Fill a CPU room layer by layer while the model computes (``kvbm_hf._fill``): True,
    #: False (every layer copied before ``load_prefix`` returns), or None: where this
    #: process may run on more CPUs than torch's threads (``spare_cpu``). The copy runs
    #: on the CPUs; overlapped with a forward that keeps every CPU busy it only takes
    #: the forward's time (measured: docs/benchmarks/hf.md, round 7).
    layered: bool | None = None

    def __init__(self, manager: KvBlockManager, model_or_config: Any, *,
                 tokenizer: Any = None, dtype: Any = None, headroom: int = 256) -> None:
        # The config is read once per model (``config_facts``): the reason, the layers
        # a DynamicCache would hold, the vocabulary and the KV shape.
        facts = config_facts(model_or_config)
        config = facts.config
        self.reason, num_layers = facts.reason, facts.num_layers
        if self.reason is not None:
            super().__init__(config=config)  # the model's own layer kinds, no reuse
        else:
            # Full attention everywhere, so every layer would be a plain DynamicLayer;
            # ours behaves the same and can also start from loaded KV. (What
            # ``DynamicCache(config=...)`` builds, without reading the config again.)
            super().__init__()
            self.layers = [KvbmLayer() for _ in range(num_layers)]
            self.layer_class_to_replicate = None
        self.headroom = headroom
        self.manager = manager
        self.layout = manager.layout
        self.page_size = manager.page_size
        self.vocab_size = facts.vocab_size
        if tokenizer is not None and self.vocab_size:
            check_vocab(tokenizer, self.vocab_size)
        self.spec: ModelSpec | None = None
        if self.reason is not None:
            _say_once(f"unsupported:{getattr(config, 'model_type', '?')}:{self.reason}",
                      "kvbm: %s is served without prefix reuse: %s",
                      facts.kind or "model", self.reason)
        else:
            self.spec = facts.spec(model_or_config, dtype)
            check_layout(self.spec, self.layout, facts.kind)
            if manager.settings.tp_size != 1:
                raise LayoutError(
                    f"tp_size: kvbm's manager is set for {manager.settings.tp_size} tensor-parallel "
                    "ranks, but a transformers model in one process holds every KV head; set "
                    "tp_size: 1 (the default)"
                )
        # Loaded KV goes where the model computes: a model's own device, else the CPU.
        dev = facts.device(model_or_config)
        self.device = dev if isinstance(dev, torch.device) else torch.device("cpu")
        self.loaded_tokens = 0
        self.offered_blocks = 0
        #: Seconds of the last ``load_prefix``'s steps: ``tokens`` (reading the ids),
        #: ``hash``, ``wait`` (for stores of these blocks still running), ``match``,
        #: ``room``, ``layers`` (the layers' views of the room), ``onboard`` (the copy),
        #: ``release`` (handing the match's pins to an I/O thread, or the other layers'
        #: copy to one, which gives the pins back after the last layer).
        self.load_times: dict[str, float] = {}
        self._state = state_of(manager)
        #: The hasher reads int64 ids as they are (``hashes_int64``): ``_u32`` keeps them.
        self._ids64 = self.reason is None and hashes_int64()
        self._room_hold: object = None
        #: The last load's layers still being copied (``wait_loaded``), or None.
        self.fill: LayerFill | None = None
        #: The tensor ``load_prefix`` read, its version then, and the row it checked.
        self._checked: tuple[torch.Tensor, int, np.ndarray] | None = None

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
        # One reduction: seen as unsigned, a negative id is larger than any vocabulary.
        if row.size and self.vocab_size and umax(row) >= self.vocab_size:
            raise TokenError(
                f"input_ids: ids must lie in [0, {self.vocab_size}) for this model, got min "
                f"{int(row.min())} and max {int(row.max())}; was it tokenized with another "
                "model's tokenizer?"
            )
        return row

    def _u32(self, row: np.ndarray) -> np.ndarray:
        """``row`` (checked by ``_tokens``) as the hasher's u32 ids: where the ids were
        checked against a vocabulary (below 2**32), the hasher's own range check (two
        numpy reductions, cold after a forward) has nothing left to refuse. ``row``
        itself where the hasher reads int64 ids as they are (its compiled chain; asked
        once per cache, not per call)."""
        if self._ids64:
            return row
        if self.vocab_size and self.vocab_size <= 2**32:
            return row.astype(np.uint32)
        return row

    def load_prefix(self, input_ids: Any) -> int:
        """Onboard the longest cached prefix of ``input_ids``; return the tokens now cached.

        Loads whole blocks only, and never the prompt's last token. Returns 0 (the
        whole prompt is computed) when nothing matches, when the prompt has no complete
        block before its last token, or when reuse is off for this model; a prompt with
        complete blocks that matched nothing is still computed into a pooled room. A
        cache that already holds KV (a conversation continued in the same cache) is left
        as it is. ``load_times`` holds the seconds of each step. The match's pins are
        given back on one of the manager's I/O threads once the copy is done
        (``manager.flush()`` waits for that too).
        """
        ts = time.perf_counter()
        if self.reason is not None:
            return self.get_seq_length()  # a plain DynamicCache: nothing loaded, ever
        # ``get_seq_length`` only where the first layer holds anything: a fresh cache
        # (every request) reads one attribute, not transformers' calls (cold here).
        if self.layers and getattr(self.layers[0], "is_initialized", True):
            have = self.get_seq_length()
            if have:
                return have
        row = self._tokens(input_ids, "load_prefix")
        if row is None:
            return 0
        if isinstance(input_ids, torch.Tensor) and not input_ids.is_inference():
            # ``offload_blocks`` of the same tensor, not changed in place since (its
            # version counter), reuses this checked row (``prefill`` passes the same).
            # Inference tensors count no versions: they are read and checked again.
            self._checked = (input_ids, input_ids._version, row)
        usable = (len(row) - 1) // self.page_size
        if usable <= 0:
            _say_once("short", "kvbm: prompts shorter than %d tokens (one block plus the last "
                      "token) have nothing to load; they run as plain prefill",
                      self.page_size + 1, level=logging.INFO)
            return 0
        t0 = time.perf_counter()
        hashes = self.manager.hash_tokens(self._u32(row[: usable * self.page_size]))
        t1 = time.perf_counter()
        # A request that just stored this prefix in the background: wait for it, then load.
        self._state.await_stores(row, hashes)
        t2 = time.perf_counter()
        # Room for the whole prompt and ``headroom`` generated tokens, so neither the
        # prefill nor the first decode steps copy the loaded prefix again; a room of an
        # earlier request, touched already, when one is free. A prompt that loads
        # nothing is computed into a room too: its pages are touched already (a
        # ``torch.cat`` would fault in fresh ones), its blocks leave it as one run each,
        # and the request that computes a prefix leaves its room to those that load it.
        capacity = len(row) + max(self.headroom, 0)
        match = self.manager.match_prefix(hashes)
        fill: LayerFill | None = None
        try:
            t3 = time.perf_counter()
            want = match.num_blocks
            dest = self._destination(max(want, 1), capacity)
            t4 = time.perf_counter()
            # The layers' views of the room before the copy (they are views of it, the
            # copy only fills them): after a copy of this size each further step costs
            # more (its code and data were evicted from the caches by the copy).
            self._hold_layers(dest, want * self.page_size)
            t5 = time.perf_counter()
            # A CPU room is filled layer by layer: the tier's rows of layers after the
            # first are copied on an I/O thread while the model computes (``_fill``).
            layered = self.layered if self.layered is not None else spare_cpu()
            if layered and self.device.type == "cpu":
                # The pins go back once the last layer is copied; the room stays held
                # (an alias) until then, whoever drops this cache first.
                dest.layered = True
                dest.fill_with(match.release, self._room_hold, self._start)
            try:
                res = self.manager.onboard(match, dest) if want else None
            except BaseException:
                fill = dest.take_fill()
                if fill is not None:  # it gives the pins back once over
                    if not fill.started:
                        self._start(fill)
                    fill.join()
                self._hold_layers(dest, 0)  # nothing loaded: the room, empty
                raise
            fill = dest.take_fill()
            t6 = time.perf_counter()
        finally:
            if fill is None:
                self._release(match)
        loaded = res.loaded if res is not None else 0
        self.fill = fill
        if fill is not None:
            if loaded != want:  # a block failed: every layer copied before the prefix ends
                fill.join()
            for li in range(fill.first, len(self.layers)):
                layer = self.layers[li]
                if isinstance(layer, KvbmLayer):  # always (``_hold_layers`` checked)
                    layer._fill = (fill, li)
        t7 = time.perf_counter()
        if loaded != want:  # a block failed its read: the prefix ends before it
            self._hold_layers(dest, loaded * self.page_size)
        self.load_times = {"tokens": t0 - ts, "hash": t1 - t0, "wait": t2 - t1, "match": t3 - t2,
                           "room": t4 - t3, "layers": t5 - t4, "onboard": t6 - t5,
                           "release": t7 - t6}
        if loaded == 0:
            return 0
        self.loaded_tokens = loaded * self.page_size
        # Blocks just loaded are in kvbm already: offering them again would only inflate
        # the admission filters' reuse counts.
        self.offered_blocks = loaded
        return self.loaded_tokens

    def _hold_layers(self, dest: CacheBlockDestination, tokens: int) -> None:
        """Each layer starts from the room's first ``tokens`` tokens (none: room reserved).

        The room's views are the pool's (``RoomViews``); the held tokens' views are made
        by each layer when first read (the model's first ``update`` needs none): on the
        request path each torch call costs tens of microseconds in cold caches.
        """
        rooms, _ = dest.kv_views(0)
        dtype, device = dest.dtype, self.device  # the pool made the room so
        for li, layer in enumerate(self.layers):
            if not isinstance(layer, KvbmLayer):  # pragma: no cover - guarded in __init__
                raise LayoutError(f"cache layer {li}: {type(layer).__name__} cannot take loaded KV")
            if tokens:
                layer._hold_room(rooms[li], tokens, dtype, device, self._room_hold)
            else:
                layer.keys = layer.values = None
                layer.is_initialized = False
                layer.reserve(*rooms[li])
                layer._keep = self._room_hold

    def _start(self, fill: LayerFill) -> None:
        """Run ``fill`` on one of the manager's I/O threads (here when they are shut down)."""
        try:
            self.manager.executor.submit(fill.run)
        except RuntimeError:  # closing: copy every layer now
            fill.run()

    def wait_loaded(self) -> None:
        """Return once every layer of the loaded prefix is in place (a no-op when the
        load copied them all before ``load_prefix`` returned); the model's reads of a
        layer wait for that layer on their own."""
        if self.fill is not None:
            self.fill.wait_all()

    def _release(self, match: Match) -> None:
        """Drop ``match``'s pins, on an I/O thread when it holds blocks (``flush`` waits).

        The blocks were copied already: a pin held a little longer only delays their
        eviction, and the request path does not pay the unpinning (a Python step per
        block, after a copy that evicted its code from the caches).
        """
        if match.num_blocks:
            try:
                self.manager.executor.submit(match.release)
                return
            except RuntimeError:  # the I/O threads are shut down (closing): here
                pass
        match.release()

    def _destination(self, num_blocks: int, capacity: int) -> CacheBlockDestination:
        """Where ``num_blocks`` loaded blocks go: a room of ``capacity`` tokens from the pool."""
        m = self.layout.model
        room, views, hold = self._state.room((m.num_layers, 2, 1, capacity, m.num_kv_heads,
                                              m.head_dim), getattr(torch, m.dtype),
                                             self.device, capacity)
        # Held while this cache lives: the room and the layers' room views are the
        # pool's (shared), so this is what keeps the room from the next request meanwhile.
        self._room_hold = hold
        return CacheBlockDestination.pooled(self.layout, num_blocks, room, views)

    def offload_blocks(
        self, input_ids: Any, *, wait: bool = True
    ) -> OffloadResult | Future[OffloadResult]:
        """Store the complete blocks of ``input_ids`` whose KV this cache holds and kvbm lacks.

        ``input_ids`` is the sequence the cache was filled with (the prompt, or the
        prompt and the generated tokens, as ``generate`` returns them); only blocks
        within both it and the cache are stored, each offered once per cache. With
        ``wait=False`` the copy runs on one of the manager's I/O threads and a ``Future``
        is returned (``manager.flush()`` waits for it too); the room it reads from is
        not handed to another request before it finishes, and a request whose prompt
        starts with these blocks waits for it before matching.
        """
        ck = self._checked
        if ck is not None and ck[0] is input_ids and ck[1] == input_ids._version:
            row: np.ndarray | None = ck[2]
        else:
            row = self._tokens(input_ids, "offload")
        if row is None or not self.layers or not getattr(self.layers[0], "is_initialized", False):
            return _done(OffloadResult(), wait)
        layers = [(layer.keys, layer.values) for layer in self.layers]  # type: ignore[union-attr]
        held = min(min(k.shape[-2], v.shape[-2]) for k, v in layers)  # type: ignore[union-attr]
        n = min(len(row), held) // self.page_size
        start = self.offered_blocks
        if n <= start:
            return _done(OffloadResult(), wait)
        self.offered_blocks = n

        if wait:
            source = CacheBlockSource(layers, self.layout)  # type: ignore[arg-type]
            hashes = self.manager.hash_tokens(self._u32(row[: n * self.page_size]))[start:]
            return self.manager.offload(hashes, source, indices=range(start, n))
        # On the request thread only what must be: the tokens copied (the caller may
        # reuse its tensor), the layers' views taken, the offload listed as started. The
        # hashing and the source's checks run on the I/O thread; until it has listed
        # the hashes, a request that matches waits for that listing (``await_stores``).
        # The I/O thread's work item keeps its function (and what that refers to) until
        # after its future is done, so the function holds neither this cache nor the
        # source: ``held_kv`` is emptied before the result is set. Otherwise the room could
        # look busy to the next request, which would then allocate (and fault in) another.
        tokens = row[: n * self.page_size].copy()
        ids = self._u32(tokens)  # a copy already where converted
        held_kv = [layers]
        del layers
        manager, layout, state = self.manager, self.layout, self._state
        # The job's own future is the one returned (no second Future), and the listing's
        # latch is a lock: each Python object built here costs more right after a forward.
        key = object()
        state.started(key, tokens, start, self.page_size)

        def run() -> OffloadResult:
            # Yield the GIL once before the store's Python work: the request thread that
            # handed this over gets back to its engine without waiting a switch interval.
            time.sleep(0)
            kv: Any = held_kv.pop()
            src: CacheBlockSource | None = None
            try:
                hashes = manager.hash_tokens(ids)[start:]
                state.listed(key, hashes)
                src = CacheBlockSource(kv, layout)
                kv = None
                res = manager.offload(hashes, src, indices=range(start, n))
            except BaseException:
                kv = src = None  # the room is free before the future is done
                raise  # the future raises it; the executor logs a failed background transfer
            src = None
            return res

        try:
            return state.run_job(key, lambda: manager.executor.submit(run))
        except BaseException:  # a closed manager: no store, and no one left waiting
            state.finished(key)
            raise

    def reset(self) -> None:
        """Drop the cached KV and start a new request in this cache."""
        super().reset()  # type: ignore[no-untyped-call]
        self.fill = None
        self._room_hold = None  # the layers dropped their rooms (``KvbmLayer.reset``)
        self._checked = None
        self.loaded_tokens = 0
        self.offered_blocks = 0


_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def spare_cpu() -> bool:
    """This process may run on more CPUs than torch's intra-op threads use: a load's
    later layers can be copied there while the model computes."""
    return torch.get_num_threads() < _CPUS


def _done(res: OffloadResult, wait: bool) -> OffloadResult | Future[OffloadResult]:
    if wait:
        return res
    fut: Future[OffloadResult] = Future()
    fut.set_result(res)
    return fut


# -- one call -------------------------------------------------------------------------


def prefill(model: Any, input_ids: torch.Tensor, cache: KvbmCache, *, offload: bool = True,
            offload_wait: bool = False, **forward_kwargs: Any) -> Any:
    """Run the prompt through ``model`` with ``cache``: load the cached prefix, compute the rest.

    Returns the model's output for the computed positions (``logits[:, -1]`` is the
    prompt's last token, as in a plain forward). With ``offload`` the prompt's new
    complete blocks are stored afterwards, in the background unless ``offload_wait``.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    n = cache.load_prefix(input_ids)
    out = model(input_ids=input_ids[:, n:], past_key_values=cache, use_cache=True, **forward_kwargs)
    if offload:
        cache.offload_blocks(input_ids, wait=offload_wait)
    return out


def generate(model: Any, input_ids: torch.Tensor, manager: KvBlockManager, *,
             tokenizer: Any = None, offload_wait: bool = False, **generate_kwargs: Any) -> Any:
    """``model.generate`` with kvbm: the cached prefix is loaded, the new blocks stored.

    Takes and returns what ``model.generate`` does (``generate_kwargs`` pass through).
    The KV of the prompt and of the generated tokens is offloaded (in the background
    unless ``offload_wait``), so the next turn of a conversation, whose prompt starts
    with this one's output, reuses all of it.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    cache = KvbmCache(manager, model, tokenizer=tokenizer)
    cache.load_prefix(input_ids)
    out = model.generate(input_ids, past_key_values=cache, **generate_kwargs)
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    cache.offload_blocks(seq, wait=offload_wait)
    return out
