"""kvbm as an SGLang HiCache storage backend (the L3 tier behind SGLang's host cache).

SGLang loads it through its ``dynamic`` storage backend::

    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvbm",
        "module_path": "kvbm.connectors.sglang", "class_name": "KvbmHiCacheStorage",
        "kvbm": {"tiers": [{"type": "host", "capacity": "64GiB"},
                           {"type": "disk", "capacity": "1TiB", "path": "/mnt/nvme/kvbm"}]}}'

(``"kvbm_config": "/path/kvbm.yaml"`` instead of ``"kvbm"``, or neither to use kvbm's
environment). SGLang calls ``KvbmHiCacheStorage(storage_config, kwargs)``, then
``get``/``set``/``exists``/``batch_get``/``batch_set``/``batch_exists`` with its page keys
(strings) and page tensors, and ``batch_get_v1``/``batch_set_v1`` with host-pool indices.

Each SGLang key names one page; kvbm stores it as one block under a 16-byte key derived
from the namespace (model, page layout, tensor-parallel rank) and the string, so two
ranks or two models never read each other's pages. The page layout is taken from
SGLang's host pool when one is registered, else from the first page seen.

The method signatures are SGLang's ``HiCacheStorage`` ones. When SGLang is installed the
class subclasses SGLang's own ``HiCacheStorage`` (its factory checks that); without it
(tests, tools) it subclasses a local copy of the same abstract interface, so this module
never needs SGLang to import.
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

from ._interface import HiCacheStorageBase

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
        self.is_mla = bool(getattr(storage_config, "is_mla_model", False))
        # MLA pages are identical on every rank: share them; otherwise key per rank.
        self.tp_rank = 0 if self.is_mla else int(getattr(storage_config, "tp_rank", 0) or 0)
        self.tp_size = 1 if self.is_mla else int(getattr(storage_config, "tp_size", 1) or 1)
        self.model_name = str(getattr(storage_config, "model_name", None) or "model")
        self.mem_pool_host = (kwargs or {}).get("mem_pool_host")
        self._mgr: KvBlockManager | None = None
        self._lock = threading.Lock()
        self._said: set[str] = set()

    # -- setup -------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """SGLang hands over its host pool: the page layout and the v1 batch path use it."""
        self.mem_pool_host = mem_pool_host

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

    def _manager(self, page: Any | None) -> KvBlockManager | None:
        """The chain, built on first use when the page size in bytes is known."""
        if self._mgr is not None:
            return self._mgr
        with self._lock:
            if self._mgr is not None:
                return self._mgr
            layout = self._layout_from_pool()
            nbytes = int(page.numel() * page.element_size()) if page is not None else None
            if layout is not None and nbytes is not None and layout.bytes_per_block != nbytes:
                self._say("pool", "kvbm: SGLang host pool pages are %d bytes but a page of %d "
                          "bytes was given; storing pages as opaque bytes", layout.bytes_per_block,
                          nbytes)
                layout = None
            if layout is None:
                if nbytes is None:
                    return None
                dt = _dtype_name(page)
                size = DTYPE_SIZES[dt]
                if nbytes % size:
                    dt, size = "uint8", 1
                # An opaque page: one "layer" of nbytes, so any page format round-trips.
                layout = BlockLayout(ModelSpec(num_layers=1, num_kv_heads=1,
                                               head_dim=nbytes // size, dtype=dt, outer_dim=1,
                                               name=self.model_name), 1)
            m = layout.model
            self._mgr = KvBlockManager.from_config(
                self._source,
                model={"name": self.model_name, "num_layers": m.num_layers,
                       "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                       "dtype": m.dtype, "outer_dim": m.outer_dim},
                page_size=layout.page_size, tp_rank=self.tp_rank, tp_size=self.tp_size,
            )
            self._seed = self._mgr.namespace.digest
            return self._mgr

    def _say(self, what: str, msg: str, *args: Any) -> None:
        if what not in self._said:
            self._said.add(what)
            log.warning(msg, *args)

    def _key(self, key: str) -> SequenceHash:
        # The namespace salts the key: another rank, model or page layout never matches.
        return SequenceHash(hashlib.blake2b(self._seed + key.encode(), digest_size=16).digest())

    def _fits(self, mgr: KvBlockManager, t: Any, what: str) -> bool:
        nbytes = int(t.numel() * t.element_size())
        if nbytes != mgr.block_bytes:
            self._say(f"size{nbytes}", "kvbm: %s page of %d bytes does not match the %d-byte "
                      "pages this backend stores; it is skipped", what, nbytes, mgr.block_bytes)
            return False
        return True

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
            if t is not None and not self._fits(mgr, t, "target"):
                continue
            match = mgr.match_prefix([self._key(k)])
            try:
                if match.num_blocks == 0:
                    continue
                if t is None:
                    t = torch.empty(mgr.block_bytes, dtype=torch.uint8)
                arr, _ = _host_bytes(t)
                staging = arr if arr is not None else np.empty(mgr.block_bytes, np.uint8)
                res = mgr.onboard(match, ContiguousBlocks(staging.reshape(1, -1), mgr.layout))
                if res.loaded != 1:
                    continue
                if arr is None:
                    t.view(-1).view(torch.uint8).copy_(torch.from_numpy(staging))
                out[i] = t
            finally:
                match.release()
        return out

    def exists(self, key: str) -> bool:
        """Whether a page is stored under ``key``."""
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: list[str], extra_info: Any | None = None) -> int:
        """How many leading keys are stored (SGLang's keys chain, so a prefix is what counts)."""
        mgr = self._manager(None)
        if mgr is None or not keys:
            return 0
        match = mgr.match_prefix([self._key(k) for k in keys])
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
        import torch

        arrays: list[np.ndarray] = []
        hashes: list[SequenceHash] = []
        ok = True
        for k, p in zip(keys, pages):
            if not self._fits(mgr, p, "value"):
                ok = False
                continue
            arr, t = _host_bytes(p)
            if arr is None:
                arr = t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
            arrays.append(arr)
            hashes.append(self._key(k))
        if not hashes:
            return False
        res = mgr.offload(hashes, _TensorPages(arrays))
        return ok and res.stored + res.present == len(hashes)

    # -- host-pool batch path (SGLang's zero-copy v1 interface) ---------------------------
    def batch_set_v1(self, keys: list[str], host_indices: Any,
                     extra_info: Any | None = None) -> list[bool]:
        """Store the host pool's pages at ``host_indices`` (one page per key)."""
        pool = self._need_pool("batch_set_v1")
        ps = int(getattr(pool, "page_size", 1) or 1)
        pages = [pool.get_data_page(int(host_indices[i * ps]), flat=True)
                 for i in range(len(keys))]
        mgr = self._manager(pages[0] if pages else None)
        if mgr is None:
            return [False] * len(keys)
        out = []
        for k, p in zip(keys, pages):
            out.append(self.batch_set([k], [p]))
        return out

    def batch_get_v1(self, keys: list[str], host_indices: Any,
                     extra_info: Any | None = None) -> list[bool]:
        """Fill the host pool's pages at ``host_indices`` from storage; one flag per key."""
        pool = self._need_pool("batch_get_v1")
        ps = int(getattr(pool, "page_size", 1) or 1)
        out = []
        for i, k in enumerate(keys):
            buf = pool.get_dummy_flat_data_page()
            got = self.get(k, buf)
            if got is None:
                out.append(False)
                continue
            pool.set_from_flat_data_page(int(host_indices[i * ps]), got)
            out.append(True)
        return out

    def _need_pool(self, what: str) -> Any:
        if self.mem_pool_host is None:
            raise RuntimeError(f"KvbmHiCacheStorage.{what}: no host pool registered; SGLang "
                               "calls register_mem_pool_host first")
        return self.mem_pool_host

    # -- housekeeping -------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every stored page that nothing pins."""
        if self._mgr is not None:
            self._mgr.release_all_evictable()

    def get_stats(self) -> dict[str, Any] | None:
        """kvbm's per-tier and per-path counters."""
        return self._mgr.stats() if self._mgr is not None else None

    def close(self) -> None:
        """Finish background copies and close the tiers."""
        if self._mgr is not None:
            self._mgr.close()
            self._mgr = None


__all__ = ["KvbmHiCacheStorage"]
