"""kvbm as an SGLang HiCache storage backend (the L3 tier behind SGLang's host cache).

SGLang loads it through its ``dynamic`` storage backend::

    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvbm",
        "module_path": "kvbm.connectors.sglang", "class_name": "KvbmHiCacheStorage",
        "kvbm": {"tiers": [{"type": "host", "capacity": "64GiB"},
                           {"type": "disk", "capacity": "1TiB", "path": "/mnt/nvme/kvbm",
                            "admission": "all"}]}}'

The disk tier says ``admission: all`` because its default filter (``frequency``,
Dynamo's SSD-lifespan filter) admits a block on its second offer, and SGLang offers
each page once: it backs a page up once and then asks whether it is stored. Without
the key no page would ever reach the disk.

(``"kvbm_config": "/path/kvbm.yaml"`` instead of ``"kvbm"``, or neither to use kvbm's
environment). SGLang calls ``KvbmHiCacheStorage(storage_config, kwargs)``, then
``get``/``set``/``exists``/``batch_get``/``batch_set``/``batch_exists`` with its page keys
(strings) and page tensors, ``batch_get_v1``/``batch_set_v1`` with host-pool indices,
and ``batch_exists_v2``/``batch_get_v2``/``batch_set_v2`` with one ``PoolTransfer`` per
host pool (hybrid models: the KV pool plus Mamba, SWA or DSA indexer pools, each
registered by ``register_mem_host_pool_v2``).

Each SGLang key names one page; kvbm stores it as one block under a 16-byte key derived
from the namespace (model, page layout, tensor-parallel rank) and the string, so two
ranks or two models never read each other's pages. The page layout is taken from
SGLang's host pool when one is registered, else from the first page seen. The pages
of each extra pool (a Mamba state is not a KV page) go to a chain of their own, under
the model name with ``:<pool>`` added, built from ``"kvbm_pools": {"<pool>": ...}`` in
the extra config when given (a config dict or YAML path), else from the KV pages'
config: size its tiers for that, since every pool's chain holds its own capacity.

The method signatures are SGLang's ``HiCacheStorage`` ones. When SGLang is installed the
class subclasses SGLang's own ``HiCacheStorage`` (its factory checks that) and returns
SGLang's ``PoolTransferResult``; without it (tests, tools) it uses local copies of the
same interface and types (``kvbm_sglang._interface``), so this module never needs
SGLang to import.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbm.hashing import SequenceHash
from kvbm.layout import DTYPE_SIZES, BlockLayout, ContiguousBlocks, ModelSpec
from kvbm.manager import KvBlockManager

from ._interface import HiCacheStorageBase, PoolHitPolicy, PoolName, PoolTransferResult

log = logging.getLogger("kvbm.sglang")


_TORCH_DTYPE_NAMES = {"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                      "int8", "uint8"}


def _dtype_name(t: Any) -> str:
    name = str(getattr(t, "dtype", "uint8")).replace("torch.", "")
    return name if name in _TORCH_DTYPE_NAMES else "uint8"


def _host_bytes(t: Any) -> tuple[np.ndarray | None, Any]:
    """A writable ``uint8`` numpy view of a tensor's bytes when it is CPU and contiguous."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor page, got {type(t).__name__}")
    if t.device.type == "cpu" and t.is_contiguous():
        return t.view(-1).view(torch.uint8).numpy(), t
    return None, t


class _TensorPages:
    """A ``BlockSource`` over separate page tensors (one block each)."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = arrays

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        for i, d in zip(indices, dst):
            np.copyto(d, self.arrays[i])


class KvbmHiCacheStorage(HiCacheStorageBase):  # type: ignore[misc]
    """An SGLang HiCache storage backend backed by a kvbm tier chain.

    ``storage_config`` is SGLang's ``HiCacheStorageConfig`` (``tp_rank``, ``tp_size``,
    ``model_name``, ``is_mla_model``, ``extra_config``); ``kwargs`` is what SGLang's
    dynamic factory passes along (it may hold ``mem_pool_host``).
    """

    def __init__(self, storage_config: Any = None, kwargs: dict[str, Any] | None = None) -> None:
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        self._source: Any = extra.get("kvbm", extra.get("kvbm_config"))
        self._pool_sources: dict[str, Any] = dict(extra.get("kvbm_pools") or {})
        self.is_mla = bool(getattr(storage_config, "is_mla_model", False))
        # MLA pages are identical on every rank: share them; otherwise key per rank.
        self.tp_rank = 0 if self.is_mla else int(getattr(storage_config, "tp_rank", 0) or 0)
        self.tp_size = 1 if self.is_mla else int(getattr(storage_config, "tp_size", 1) or 1)
        self.model_name = str(getattr(storage_config, "model_name", None) or "model")
        self.mem_pool_host = (kwargs or {}).get("mem_pool_host")
        self.registered_pools: dict[Any, Any] = {}
        self._mgr: KvBlockManager | None = None
        self._pool_mgrs: dict[str, KvBlockManager] = {}  # extra pools' chains, by pool name
        self._lock = threading.Lock()
        self._said: set[str] = set()

    # -- setup -------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """SGLang hands over its host pool: the page layout and the v1 batch path use it."""
        self.mem_pool_host = mem_pool_host

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """SGLang hands over one named host pool for the v2 calls (``kv``, ``mamba`` ...)."""
        self.registered_pools[host_pool_name] = host_pool
        if str(host_pool_name) == str(PoolName.KV) and self.mem_pool_host is None:
            self.mem_pool_host = host_pool

    def _layout_from_pool(self) -> BlockLayout | None:
        pool = self.mem_pool_host
        if pool is None:
            return None
        try:
            dtype = str(pool.dtype).replace("torch.", "")
            if dtype not in DTYPE_SIZES:
                return None
            if self.is_mla:
                model = ModelSpec(num_layers=int(pool.layer_num), num_kv_heads=1,
                                  head_dim=int(pool.kv_lora_rank + pool.qk_rope_head_dim),
                                  dtype=dtype, outer_dim=1, name=self.model_name)
            else:
                model = ModelSpec(num_layers=int(pool.layer_num), num_kv_heads=int(pool.head_num),
                                  head_dim=int(pool.head_dim), dtype=dtype, outer_dim=2,
                                  name=self.model_name)
            return BlockLayout(model, int(pool.page_size))
        except (AttributeError, TypeError, ValueError):
            return None

    def _opaque_layout(self, page: Any, name: str) -> BlockLayout:
        """A layout of one "layer" of the page's bytes, so any page format round-trips."""
        nbytes = int(page.numel() * page.element_size())
        dt = _dtype_name(page)
        size = DTYPE_SIZES[dt]
        if nbytes % size:
            dt, size = "uint8", 1
        return BlockLayout(ModelSpec(num_layers=1, num_kv_heads=1, head_dim=nbytes // size,
                                     dtype=dt, outer_dim=1, name=name), 1)

    def _build(self, source: Any, name: str, layout: BlockLayout) -> KvBlockManager:
        m = layout.model
        return KvBlockManager.from_config(
            source,
            model={"name": name, "num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads,
                   "head_dim": m.head_dim, "dtype": m.dtype, "outer_dim": m.outer_dim},
            page_size=layout.page_size, tp_rank=self.tp_rank, tp_size=self.tp_size,
        )

    def _manager(self, page: Any | None) -> KvBlockManager | None:
        """The KV pages' chain, built on first use when the page size in bytes is known."""
        if self._mgr is not None:
            return self._mgr
        with self._lock:
            if self._mgr is not None:
                return self._mgr
            layout = self._layout_from_pool()
            if page is None and layout is None and self.mem_pool_host is not None:
                try:
                    page = self.mem_pool_host.get_dummy_flat_data_page()
                except AttributeError:
                    page = None
            nbytes = int(page.numel() * page.element_size()) if page is not None else None
            if layout is not None and nbytes is not None and layout.bytes_per_block != nbytes:
                self._say("pool", "kvbm: SGLang host pool pages are %d bytes but a page of %d "
                          "bytes was given; storing pages as opaque bytes", layout.bytes_per_block,
                          nbytes)
                layout = None
            if layout is None:
                if page is None:
                    return None
                layout = self._opaque_layout(page, self.model_name)
            self._mgr = self._build(self._source, self.model_name, layout)
            return self._mgr

    def _pool_manager(self, name: str, pool: Any) -> KvBlockManager:
        """The chain of an extra pool's pages (a Mamba state, an SWA or indexer page)."""
        if name == str(PoolName.KV):
            mgr = self._manager(pool.get_dummy_flat_data_page())
            assert mgr is not None
            return mgr
        with self._lock:
            mgr = self._pool_mgrs.get(name)
            if mgr is None:
                label = f"{self.model_name}:{name}"
                layout = self._opaque_layout(pool.get_dummy_flat_data_page(), label)
                source = self._pool_sources.get(name, self._source)
                mgr = self._pool_mgrs[name] = self._build(source, label, layout)
            return mgr

    def _say(self, what: str, msg: str, *args: Any) -> None:
        if what not in self._said:
            self._said.add(what)
            log.warning(msg, *args)

    @staticmethod
    def _key_in(mgr: KvBlockManager, key: str) -> SequenceHash:
        # The namespace salts the key: another rank, model, pool or page layout never matches.
        return SequenceHash(hashlib.blake2b(mgr.namespace.digest + key.encode(),
                                            digest_size=16).digest())

    def _key(self, key: str) -> SequenceHash:
        mgr = self._manager(None)
        if mgr is None:
            raise RuntimeError("KvbmHiCacheStorage: no page seen and no host pool registered")
        return self._key_in(mgr, key)

    def _fits(self, mgr: KvBlockManager, t: Any, what: str) -> bool:
        nbytes = int(t.numel() * t.element_size())
        if nbytes != mgr.block_bytes:
            self._say(f"size{nbytes}", "kvbm: %s page of %d bytes does not match the %d-byte "
                      "pages this backend stores; it is skipped", what, nbytes, mgr.block_bytes)
            return False
        return True

    # -- the two operations every call family comes down to ------------------------------
    def _load(self, mgr: KvBlockManager, key: str, t: Any) -> bool:
        """Fill tensor ``t`` with the page stored under ``key``; False (``t`` untouched or
        partly written, never used) when it is not stored intact."""
        import torch

        if not self._fits(mgr, t, "target"):
            return False
        match = mgr.match_prefix([self._key_in(mgr, key)])
        try:
            if match.num_blocks == 0:
                return False
            arr, _ = _host_bytes(t)
            staging = arr if arr is not None else np.empty(mgr.block_bytes, np.uint8)
            res = mgr.onboard(match, ContiguousBlocks(staging.reshape(1, -1), mgr.layout))
            if res.loaded != 1:
                return False
            if arr is None:
                t.view(-1).view(torch.uint8).copy_(torch.from_numpy(staging))
            return True
        finally:
            match.release()

    def _store(self, mgr: KvBlockManager, keys: Sequence[str], pages: Sequence[Any]) -> list[bool]:
        """Store pages in one offload; per key, whether it is stored now (or was already)."""
        import torch

        arrays: list[np.ndarray] = []
        hashes: list[SequenceHash] = []
        fits = []
        for k, p in zip(keys, pages):
            fits.append(self._fits(mgr, p, "value"))
            if not fits[-1]:
                continue
            arr, t = _host_bytes(p)
            if arr is None:
                arr = t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
            arrays.append(arr)
            hashes.append(self._key_in(mgr, k))
        if not hashes:
            return fits
        res = mgr.offload(hashes, _TensorPages(arrays))
        if all(fits) and res.stored + res.present == len(hashes):
            return fits
        # Some were refused (admission, no free slot, a failed write): ask which are held.
        return [ok and self._held(mgr, k) for k, ok in zip(keys, fits)]

    def _held(self, mgr: KvBlockManager, key: str) -> bool:
        match = mgr.match_prefix([self._key_in(mgr, key)])
        try:
            return match.num_blocks == 1
        finally:
            match.release()

    # -- reads ---------------------------------------------------------------------------
    def get(self, key: str, target_location: Any | None = None,
            target_sizes: Any | None = None) -> Any | None:
        """The page stored under ``key`` (written into ``target_location`` if given), or None."""
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: list[str], target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> list[Any | None]:
        """One page or None per key; each key is looked up on its own."""
        import torch

        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        first = next((t for t in targets if t is not None), None)
        mgr = self._manager(first)
        out: list[Any | None] = [None] * len(keys)
        if mgr is None:
            return out
        for i, (k, t) in enumerate(zip(keys, targets)):
            if t is None:
                t = torch.empty(mgr.block_bytes, dtype=torch.uint8)
            if self._load(mgr, k, t):
                out[i] = t
        return out

    def exists(self, key: str) -> bool:
        """Whether a page is stored under ``key``."""
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: list[str], extra_info: Any | None = None) -> int:
        """How many leading keys are stored (SGLang's keys chain, so a prefix is what counts)."""
        mgr = self._manager(None)
        if mgr is None or not keys:
            return 0
        match = mgr.match_prefix([self._key_in(mgr, k) for k in keys])
        try:
            return match.num_blocks
        finally:
            match.release()

    # -- writes --------------------------------------------------------------------------
    def set(self, key: str, value: Any | None = None, target_location: Any | None = None,
            target_sizes: Any | None = None) -> bool:
        """Store one page; True if stored or already present (a repeated set writes nothing)."""
        page = value if value is not None else target_location
        if page is None:
            raise ValueError("KvbmHiCacheStorage.set: give the page as value or target_location")
        return self.batch_set([key], [page])

    def batch_set(self, keys: list[str], values: Any | None = None,
                  target_locations: Any | None = None, target_sizes: Any | None = None) -> bool:
        """Store pages in one offload; True only if every page is stored or present."""
        pages = list(values if values is not None else (target_locations or []))
        if len(pages) != len(keys):
            raise ValueError(f"KvbmHiCacheStorage.batch_set: {len(keys)} keys but "
                             f"{len(pages)} pages")
        if not keys:
            return True
        mgr = self._manager(pages[0])
        if mgr is None:
            return False
        return all(self._store(mgr, keys, pages))

    # -- host-pool batch path (SGLang's zero-copy v1 interface) ---------------------------
    def batch_set_v1(self, keys: list[str], host_indices: Any,
                     extra_info: Any | None = None) -> list[bool]:
        """Store the host pool's pages at ``host_indices`` (one page per key)."""
        pool = self._need_pool("batch_set_v1")
        return self._pool_set(str(PoolName.KV), pool, keys, host_indices)

    def batch_get_v1(self, keys: list[str], host_indices: Any,
                     extra_info: Any | None = None) -> list[bool]:
        """Fill the host pool's pages at ``host_indices`` from storage; one flag per key."""
        pool = self._need_pool("batch_get_v1")
        return self._pool_get(str(PoolName.KV), pool, keys, host_indices)

    def _need_pool(self, what: str) -> Any:
        if self.mem_pool_host is None:
            raise RuntimeError(f"KvbmHiCacheStorage.{what}: no host pool registered; SGLang "
                               "calls register_mem_pool_host first")
        return self.mem_pool_host

    def _page_offsets(self, name: str, pool: Any, keys: Sequence[str],
                      host_indices: Any) -> list[int] | None:
        """The pool index of each key's page (the first token index of its page), or None
        when ``host_indices`` does not hold ``page_size`` indices per key."""
        ps = int(getattr(pool, "page_size", 1) or 1)
        n = 0 if host_indices is None else int(
            host_indices.numel() if hasattr(host_indices, "numel") else len(host_indices))
        if n != len(keys) * ps:
            self._say(f"indices-{name}", "kvbm: SGLang gave %d host indices for %d pages of "
                      "pool %r (page size %d); those pages are not transferred", n, len(keys),
                      name, ps)
            return None
        return [int(host_indices[i * ps]) for i in range(len(keys))]

    def _pool_set(self, name: str, pool: Any, keys: Sequence[str], host_indices: Any) -> list[bool]:
        offsets = self._page_offsets(name, pool, keys, host_indices)
        if offsets is None:
            return [False] * len(keys)
        if not keys:
            return []
        pages = [pool.get_data_page(o, flat=True) for o in offsets]
        return self._store(self._pool_manager(name, pool), keys, pages)

    def _pool_get(self, name: str, pool: Any, keys: Sequence[str], host_indices: Any) -> list[bool]:
        offsets = self._page_offsets(name, pool, keys, host_indices)
        if offsets is None:
            return [False] * len(keys)
        if not keys:
            return []
        mgr = self._pool_manager(name, pool)
        out = []
        for k, o in zip(keys, offsets):
            buf = pool.get_dummy_flat_data_page()
            ok = self._load(mgr, k, buf)
            if ok:
                pool.set_from_flat_data_page(o, buf)
            out.append(ok)
        return out

    # -- pool transfers (SGLang's v2 interface: hybrid models' extra pools) ---------------
    def _registered(self, name: Any) -> Any | None:
        pool = self.registered_pools.get(name)
        if pool is None:
            pool = next((p for n, p in self.registered_pools.items() if str(n) == str(name)), None)
        if pool is None and str(name) == str(PoolName.KV):
            pool = self.mem_pool_host
        return pool

    def _v2(self, transfers: list[Any], write: bool) -> dict[str, list[bool]]:
        results: dict[str, list[bool]] = {}
        for tr in transfers:
            keys = list(tr.keys or [])
            pool = self._registered(tr.name)
            if pool is None:
                self._say(f"nopool-{tr.name}", "kvbm: no host pool %r was registered "
                          "(register_mem_host_pool_v2); its pages are not transferred", str(tr.name))
                results[tr.name] = [False] * len(keys)
                continue
            op = self._pool_set if write else self._pool_get
            results[tr.name] = op(str(tr.name), pool, keys, tr.host_indices)
        return results

    def batch_get_v2(self, transfers: list[Any],
                     extra_info: Any | None = None) -> dict[str, list[bool]]:
        """Fill each transfer's host pool at its ``host_indices`` with the pages of its
        ``keys``; per pool name, one success flag per key."""
        return self._v2(transfers, write=False)

    def batch_set_v2(self, transfers: list[Any],
                     extra_info: Any | None = None) -> dict[str, list[bool]]:
        """Store each transfer's host-pool pages (at its ``host_indices``) under its
        ``keys``; per pool name, one success flag per key."""
        return self._v2(transfers, write=True)

    def batch_exists_v2(self, keys: list[str], pool_transfers: list[Any] | None = None,
                        extra_info: Any | None = None) -> Any:
        """The usable prefix of ``keys`` (KV pages) given what the extra pools hold.

        An ``all_pages`` pool must hold a page for every key of the prefix; a
        ``trailing_pages`` pool (Mamba, SWA) only for its last ``len(transfer.keys)``
        keys (at least one), so the prefix is cut back to where such a tail is stored.
        Extra pools' pages are stored under the KV page keys in their own chains.
        """
        kv = self.batch_exists(keys)
        hits: dict[Any, int] = {PoolName.KV: kv} if kv else {}
        final = kv
        for tr in pool_transfers or []:
            if final == 0:
                break
            pool = self._registered(tr.name)
            if pool is None:
                held = [False] * kv
            else:
                mgr = self._pool_manager(str(tr.name), pool)
                held = [self._held(mgr, k) for k in keys[:kv]]
            if str(tr.hit_policy) == str(PoolHitPolicy.TRAILING_PAGES):
                tail = max(1, len(tr.keys) if tr.keys else 1)
                boundary = next((n for n in range(kv, 0, -1)
                                 if all(held[max(0, n - tail):n])), 0)
            else:
                boundary = held.index(False) if False in held else kv
            if boundary:
                hits[tr.name] = boundary
            final = min(final, boundary)
        return PoolTransferResult(final, hits)

    # -- housekeeping -------------------------------------------------------------------
    def _managers(self) -> list[KvBlockManager]:
        return ([self._mgr] if self._mgr is not None else []) + list(self._pool_mgrs.values())

    def clear(self) -> None:
        """Drop every stored page that nothing pins."""
        for mgr in self._managers():
            mgr.release_all_evictable()

    def get_stats(self) -> dict[str, Any] | None:
        """kvbm's per-tier and per-path counters (the KV pages' chain; ``pools``: each
        extra pool's)."""
        if self._mgr is None and not self._pool_mgrs:
            return None
        stats = self._mgr.stats() if self._mgr is not None else {}
        if self._pool_mgrs:
            stats = {**stats, "pools": {n: m.stats() for n, m in self._pool_mgrs.items()}}
        return stats

    def close(self) -> None:
        """Finish background copies and close the tiers."""
        for mgr in self._managers():
            mgr.close()
        self._mgr = None
        self._pool_mgrs = {}


__all__ = ["KvbmHiCacheStorage"]
