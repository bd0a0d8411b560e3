"""kvbm's SGLang HiCache storage backend against the ``HiCacheStorage`` contract.

SGLang itself is not installed here; the backend is built the way SGLang's ``dynamic``
storage-backend factory builds it (import ``module_path``, take ``class_name``, call it
with ``(storage_config, kwargs)``) from a config with ``HiCacheStorageConfig``'s fields,
and driven with real torch page tensors.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

torch = pytest.importorskip("torch")

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


def test_host_pool_v1_batch_path_round_trips_pages(make: Any) -> None:
    class HostPool:
        """The three methods of SGLang's HostKVCache the v1 path calls, on a real tensor."""

        page_size = 16

        def __init__(self) -> None:
            self.data = torch.zeros((4,) + PAGE_SHAPE, dtype=torch.bfloat16)

        def get_data_page(self, index: int, flat: bool = True) -> Any:
            return self.data[index // self.page_size].flatten()

        def get_dummy_flat_data_page(self) -> Any:
            return torch.zeros(self.data[0].numel(), dtype=torch.bfloat16)

        def set_from_flat_data_page(self, index: int, data_page: Any) -> None:
            self.data[index // self.page_size] = data_page.view(PAGE_SHAPE)

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
