"""kvbm's SGLang HiCache storage backend against the ``HiCacheStorage`` contract.

SGLang itself is not installed here; the backend is built the way SGLang's ``dynamic``
storage-backend factory builds it (import ``module_path``, take ``class_name``, call it
with ``(storage_config, kwargs)``) from a config with ``HiCacheStorageConfig``'s fields,
and driven with real torch page tensors.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from kvbm_sglang._interface import (  # noqa: E402
    PoolHitPolicy,
    PoolName,
    PoolTransfer,
    PoolTransferResult,
)

PAGE_SHAPE = (2, 2, 16, 4, 8)  # K/V x layers x tokens x heads x head_dim
EXTRA = {"backend_name": "kvbm", "module_path": "kvbm.connectors.sglang",
         "class_name": "KvbmHiCacheStorage"}


@dataclass
class StorageConfig:
    """The fields of SGLang's ``HiCacheStorageConfig`` the backend reads."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    attn_cp_rank: int = 0
    attn_cp_size: int = 1
    is_mla_model: bool = False
    enable_storage_metrics: bool = False
    is_page_first_layout: bool = False
    model_name: str | None = "tiny-llama"
    extra_config: dict[str, Any] = field(default_factory=dict)


def dynamic_backend(cfg: StorageConfig) -> Any:
    """What SGLang's StorageBackendFactory does for ``--hicache-storage-backend dynamic``."""
    extra = cfg.extra_config
    cls = getattr(importlib.import_module(extra["module_path"]), extra["class_name"])
    return cls(cfg, {})


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[Any] = []

    def build(tiers: list[dict[str, Any]] | None = None, **kw: Any) -> Any:
        extra = dict(EXTRA, kvbm={"tiers": tiers or [{"type": "host", "num_blocks": 32}]})
        b = dynamic_backend(StorageConfig(extra_config=extra, **kw))
        made.append(b)
        return b

    yield build
    for b in made:
        b.close()


def page(seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(PAGE_SHAPE, generator=g).to(torch.bfloat16)


def test_get_of_a_missing_key_returns_none(make: Any) -> None:
    s = make()
    assert s.get("nope", torch.empty(PAGE_SHAPE, dtype=torch.bfloat16)) is None
    assert s.get("nope") is None


def test_set_then_get_returns_the_same_bytes_into_the_target(make: Any) -> None:
    s = make()
    p = page(1)
    assert s.set("k1", p) is True
    target = torch.zeros(PAGE_SHAPE, dtype=torch.bfloat16)
    got = s.get("k1", target)
    assert got is target
    assert torch.equal(target, p)


def test_set_is_idempotent_and_stores_once(make: Any) -> None:
    s = make()
    p = page(2)
    assert s.set("k", p) and s.set("k", page(3))
    stats = s.get_stats()
    assert stats["tiers"]["host"]["used_blocks"] == 1
    got = s.get("k", torch.empty_like(p))
    assert torch.equal(got, p), "the first value stays; a repeated set writes nothing"


def test_exists_tells_stored_from_missing_keys(make: Any) -> None:
    s = make()
    s.set("here", page(4))
    assert s.exists("here") is True
    assert s.exists("gone") is False


def test_batch_set_then_batch_get_with_a_missing_key(make: Any) -> None:
    s = make()
    pages = [page(i) for i in range(3)]
    assert s.batch_set(["a", "b", "c"], pages) is True
    targets = [torch.empty(PAGE_SHAPE, dtype=torch.bfloat16) for _ in range(4)]
    got = s.batch_get(["a", "x", "c", "b"], targets)
    assert got[1] is None
    for g, want in zip([got[0], got[2], got[3]], [pages[0], pages[2], pages[1]]):
        assert g is not None and torch.equal(g, want)


def test_batch_exists_counts_the_leading_stored_keys(make: Any) -> None:
    s = make()
    s.batch_set(["p0", "p1", "p3"], [page(i) for i in range(3)])
    assert s.batch_exists(["p0", "p1", "p2", "p3"]) == 2
    assert s.batch_exists(["p9", "p0"]) == 0


def test_page_of_the_wrong_size_is_refused_not_truncated(make: Any) -> None:
    s = make()
    s.set("k", page(5))
    assert s.set("small", torch.zeros(8, dtype=torch.bfloat16)) is False
    assert s.get("k", torch.zeros(8, dtype=torch.bfloat16)) is None


def test_pages_evicted_from_host_are_read_back_from_the_lower_tier(make: Any) -> None:
    s = make(tiers=[{"type": "host", "name": "fast", "num_blocks": 2},
                    {"type": "host", "name": "big", "num_blocks": 32}])
    pages = {f"k{i}": page(10 + i) for i in range(6)}
    for k, p in pages.items():
        assert s.set(k, p)
        # The fast tier pins a page until its write-through copy lands below.
        s._mgr.flush(timeout=10)
    assert s.get_stats()["tiers"]["fast"]["evictions"] >= 4
    for k, p in pages.items():
        got = s.get(k, torch.empty(PAGE_SHAPE, dtype=torch.bfloat16))
        assert got is not None and torch.equal(got, p), k


def test_ranks_and_models_do_not_read_each_others_pages(make: Any) -> None:
    r0 = make(tp_rank=0, tp_size=2)
    r1 = make(tp_rank=1, tp_size=2)
    p = page(20)
    r0.set("same-key", p)
    r1.set("other", page(21))
    assert r0._key("same-key") != r1._key("same-key")
    other_model = make(model_name="another-model")
    other_model.set("x", p)
    assert other_model._key("same-key") != r0._key("same-key")


class HostPool:
    """The three methods of SGLang's HostKVCache (and its Mamba/SWA/indexer host pools)
    the v1 and v2 paths call, on a real tensor: ``pages`` pages of ``shape`` each,
    indexed by token (``page_size`` tokens a page)."""

    def __init__(self, shape: tuple[int, ...] = PAGE_SHAPE, page_size: int = 16,
                 pages: int = 4, dtype: Any = None) -> None:
        self.shape, self.page_size = shape, page_size
        self.data = torch.zeros((pages,) + shape, dtype=dtype or torch.bfloat16)

    def get_data_page(self, index: int, flat: bool = True) -> Any:
        return self.data[index // self.page_size].flatten()

    def get_dummy_flat_data_page(self) -> Any:
        return torch.zeros(self.data[0].numel(), dtype=self.data.dtype)

    def set_from_flat_data_page(self, index: int, data_page: Any) -> None:
        self.data[index // self.page_size] = data_page.view(self.shape)


def test_host_pool_v1_batch_path_round_trips_pages(make: Any) -> None:
    s = make()
    pool = HostPool()
    s.register_mem_pool_host(pool)
    pool.data[0] = page(30)
    pool.data[1] = page(31)
    idx = torch.arange(0, 32)
    assert s.batch_set_v1(["a", "b"], idx) == [True, True]
    fresh = HostPool()
    s.register_mem_pool_host(fresh)
    assert s.batch_get_v1(["b", "zz"], torch.arange(32, 64)) == [True, False]
    assert torch.equal(fresh.data[2], pool.data[1])


# -- v2: one PoolTransfer per host pool (hybrid models) --------------------------------------

MAMBA_SHAPE = (3, 40)  # one request's SSM state: not a KV page, 480 bytes of float32


def mamba_state(seed: int) -> Any:
    return torch.randn(MAMBA_SHAPE, generator=torch.Generator().manual_seed(seed))


def hybrid(s: Any, pages: int = 8) -> tuple[HostPool, HostPool]:
    """A KV host pool and a Mamba host pool registered the way SGLang's controller does."""
    kv = HostPool(pages=pages)
    mamba = HostPool(MAMBA_SHAPE, page_size=1, pages=pages, dtype=torch.float32)
    s.register_mem_pool_host(kv)
    s.register_mem_host_pool_v2(kv, PoolName.KV)
    s.register_mem_host_pool_v2(mamba, PoolName.MAMBA)
    return kv, mamba


def fill(kv: HostPool, mamba: HostPool, seed: int) -> None:
    for i in range(kv.data.shape[0]):
        kv.data[i] = page(seed + i)
        mamba.data[i] = mamba_state(seed + 100 + i)


def kv_transfer(keys: list[str], first_page: int = 0) -> Any:
    idx = torch.arange(first_page * 16, (first_page + len(keys)) * 16)
    return PoolTransfer(name=PoolName.KV, host_indices=idx, keys=keys)


def mamba_transfer(keys: list[str], first: int = 0, policy: Any = None) -> Any:
    return PoolTransfer(name=PoolName.MAMBA, host_indices=torch.arange(first, first + len(keys)),
                        keys=keys, hit_policy=policy or PoolHitPolicy.ALL_PAGES)


@pytest.fixture
def disk_chain(tmp_path: Any) -> list[dict[str, Any]]:
    """host (2 pages) over an O_DIRECT disk tier that admits every page."""
    return [{"type": "host", "num_blocks": 2},
            {"type": "disk", "num_blocks": 16, "path": str(tmp_path), "admission": "all"}]


def test_v2_kv_and_mamba_pages_round_trip_byte_exact_through_host_and_disk(
        make: Any, disk_chain: list[dict[str, Any]]) -> None:
    s = make(tiers=disk_chain)
    kv, mamba = hybrid(s, pages=4)
    fill(kv, mamba, seed=40)
    keys = ["h0", "h1", "h2", "h3"]
    res = s.batch_set_v2([kv_transfer(keys), mamba_transfer(keys)])
    assert res == {PoolName.KV: [True] * 4, PoolName.MAMBA: [True] * 4}
    for m in s._managers():
        m.flush(timeout=10)
    s.close()
    # A restarted backend: the host tiers are empty, every page comes back from disk.
    s2 = make(tiers=disk_chain)
    kv2, mamba2 = hybrid(s2, pages=4)
    got = s2.batch_get_v2([kv_transfer(keys), mamba_transfer(keys)])
    assert got == {PoolName.KV: [True] * 4, PoolName.MAMBA: [True] * 4}
    assert torch.equal(kv2.data, kv.data) and torch.equal(mamba2.data, mamba.data)
    assert s2.get_stats()["tiers"]["disk"]["used_blocks"] == 4
    assert s2.get_stats()["pools"][str(PoolName.MAMBA)]["tiers"]["disk"]["used_blocks"] == 4


def test_v2_reads_a_missing_page_as_false_and_leaves_its_slot_alone(make: Any) -> None:
    s = make()
    kv, mamba = hybrid(s)
    fill(kv, mamba, seed=50)
    s.batch_set_v2([mamba_transfer(["a", "b"])])
    fresh = HostPool(MAMBA_SHAPE, page_size=1, pages=8, dtype=torch.float32)
    s.register_mem_host_pool_v2(fresh, PoolName.MAMBA)
    got = s.batch_get_v2([mamba_transfer(["a", "zz", "b"], first=4)])
    assert got == {PoolName.MAMBA: [True, False, True]}
    assert torch.equal(fresh.data[4], mamba.data[0]) and torch.equal(fresh.data[6], mamba.data[1])
    assert not fresh.data[5].any(), "a miss writes nothing"


def test_v2_pools_keep_their_own_pages_under_the_same_key(make: Any) -> None:
    s = make()
    kv, mamba = hybrid(s)
    fill(kv, mamba, seed=60)
    s.batch_set_v2([kv_transfer(["k"]), mamba_transfer(["k"])])
    kv_back = HostPool(pages=8)
    s.register_mem_host_pool_v2(kv_back, PoolName.KV)
    s.register_mem_pool_host(kv_back)
    assert s.batch_get_v2([kv_transfer(["k"], first_page=3)]) == {PoolName.KV: [True]}
    assert torch.equal(kv_back.data[3], kv.data[0])  # the KV page, not the Mamba state


def test_v1_and_v2_kv_transfers_are_the_same_pages(make: Any) -> None:
    s = make()
    kv, mamba = hybrid(s)
    fill(kv, mamba, seed=70)
    assert s.batch_set_v1(["p0", "p1"], torch.arange(0, 32)) == [True, True]
    back = HostPool(pages=8)
    s.register_mem_host_pool_v2(back, PoolName.KV)
    assert s.batch_get_v2([kv_transfer(["p1", "p0"], first_page=5)]) == {PoolName.KV: [True, True]}
    assert torch.equal(back.data[5], kv.data[1]) and torch.equal(back.data[6], kv.data[0])
    assert s.batch_exists(["p0", "p1"]) == 2


def test_v2_exists_cuts_the_kv_prefix_where_an_all_pages_pool_misses_a_page(make: Any) -> None:
    s = make()
    kv, mamba = hybrid(s)
    fill(kv, mamba, seed=80)
    keys = ["a", "b", "c", "d"]
    s.batch_set_v2([kv_transfer(keys)])
    s.batch_set_v2([mamba_transfer(["a", "b"])])  # the indexer-like pool lacks c and d
    r = s.batch_exists_v2(keys + ["e"], [mamba_transfer(keys)])
    assert isinstance(r, PoolTransferResult)
    assert (r.kv_hit_pages, r.extra_pool_hit_pages) == (2, {PoolName.KV: 4, PoolName.MAMBA: 2})


def test_v2_exists_needs_only_the_tail_of_a_trailing_pages_pool(make: Any) -> None:
    s = make()
    kv, mamba = hybrid(s)
    fill(kv, mamba, seed=90)
    keys = ["a", "b", "c", "d"]
    s.batch_set_v2([kv_transfer(keys)])
    s.batch_set_v2([mamba_transfer(["b"], first=1)])  # a state after page b only
    r = s.batch_exists_v2(keys, [mamba_transfer(["x"], policy=PoolHitPolicy.TRAILING_PAGES)])
    assert (r.kv_hit_pages, r.extra_pool_hit_pages) == (2, {PoolName.KV: 4, PoolName.MAMBA: 2})
    s.batch_set_v2([mamba_transfer(["d"], first=3)])
    r = s.batch_exists_v2(keys, [mamba_transfer(["x"], policy=PoolHitPolicy.TRAILING_PAGES)])
    assert r.kv_hit_pages == 4
    r = s.batch_exists_v2(["zz"] + keys, [mamba_transfer(["x"])])
    assert (r.kv_hit_pages, r.extra_pool_hit_pages) == (0, {})


def test_v2_refuses_a_transfer_whose_indices_do_not_cover_its_pages(make: Any) -> None:
    s = make()
    kv, mamba = hybrid(s)
    fill(kv, mamba, seed=100)
    short = PoolTransfer(name=PoolName.KV, host_indices=torch.arange(0, 20), keys=["a", "b"])
    res = s.batch_set_v2([short, mamba_transfer(["a", "b"])])
    assert res == {PoolName.KV: [False, False], PoolName.MAMBA: [True, True]}
    assert s.batch_exists(["a"]) == 0


def test_v2_a_pool_never_registered_fails_its_pages(make: Any) -> None:
    s = make()
    hybrid(s)
    swa = PoolTransfer(name=PoolName.SWA, host_indices=torch.arange(0, 2), keys=["a", "b"])
    assert s.batch_set_v2([swa]) == {PoolName.SWA: [False, False]}
    assert s.batch_get_v2([swa]) == {PoolName.SWA: [False, False]}


def test_the_v2_methods_take_sglangs_parameters() -> None:
    """Parameter names as SGLang's HiCacheStorage declares them (sglang/srt/mem_cache/
    hicache_storage.py): SGLang passes some of them by keyword."""
    from kvbm_sglang.storage import KvbmHiCacheStorage

    want = {
        "register_mem_host_pool_v2": ["host_pool", "host_pool_name"],
        "batch_exists_v2": ["keys", "pool_transfers", "extra_info"],
        "batch_get_v2": ["transfers", "extra_info"],
        "batch_set_v2": ["transfers", "extra_info"],
        "batch_get_v1": ["keys", "host_indices", "extra_info"],
        "batch_set_v1": ["keys", "host_indices", "extra_info"],
    }
    for name, params in want.items():
        got = list(inspect.signature(getattr(KvbmHiCacheStorage, name)).parameters)[1:]
        assert got == params, name
    fields = [f.name for f in dataclasses.fields(PoolTransfer)]
    assert fields == ["name", "host_indices", "device_indices", "keys", "hit_policy",
                      "nodes_to_load", "indices_from_pool"]


# -- the chain the module docstring documents --------------------------------------------------

def documented_chain() -> list[dict[str, Any]]:
    """The ``kvbm`` tiers of the extra config in kvbm_sglang.storage's docstring."""
    import kvbm_sglang.storage as mod

    doc = mod.__doc__ or ""
    m = re.search(r"--hicache-storage-backend-extra-config '(.*?)'", doc, re.DOTALL)
    assert m, "the docstring shows no extra config"
    return list(json.loads(m.group(1))["kvbm"]["tiers"])


def small(chain: list[dict[str, Any]], tmp_path: Any) -> list[dict[str, Any]]:
    """The documented chain at test size: capacities as a few blocks, paths under tmp."""
    out = []
    for t in chain:
        t = {k: v for k, v in t.items() if k != "capacity"}
        t["num_blocks"] = 2 if t["type"] == "host" else 16
        if "path" in t:
            t["path"] = str(tmp_path)
        out.append(t)
    return out


def written_to_disk(make: Any, tiers: list[dict[str, Any]]) -> int:
    s = make(tiers=tiers)
    for i in range(4):
        assert s.set(f"doc{i}", page(200 + i))
    s._mgr.flush(timeout=10)
    return int(s.get_stats()["tiers"]["disk"]["used_blocks"])


def test_the_documented_chain_writes_every_page_to_disk(make: Any, tmp_path: Any) -> None:
    chain = small(documented_chain(), tmp_path / "documented")
    assert [t["type"] for t in chain] == ["host", "disk"]
    assert written_to_disk(make, chain) == 4
    # Negative control: the disk tier's default filter (frequency) keeps pages SGLang
    # offers once off the disk, which is why the docstring's chain names admission.
    without = [{k: v for k, v in t.items() if k != "admission"}
               for t in small(documented_chain(), tmp_path / "default-filter")]
    assert written_to_disk(make, without) == 0
