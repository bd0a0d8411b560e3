"""Policies as plugins: ours are registered, and a third party's distribution on sys.path
adds an eviction policy and an admission filter that a YAML config then uses."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from distributions import make_distribution, on_sys_path

from kvbm import ContiguousBlocks, KvBlockManager
from kvbm.plugins import build_plugins

from conftest import PAGE, SMALL_MODEL

THIRD_PARTY = '''
"""A third party's policies: most-recently-used eviction and an every-other-block filter."""
from collections import OrderedDict

from kvbm.hookspecs import hookimpl
from kvbm.policy import AdmissionPolicy, EvictionPolicy


class MRUPolicy(EvictionPolicy):
    def __init__(self, capacity, **options):
        super().__init__(capacity)
        self.order = OrderedDict()

    def insert(self, key, priority=0):
        self.order[key] = None

    def touch(self, key):
        if key in self.order:
            self.order.move_to_end(key)

    def pin(self, key):
        self.order.pop(key, None)

    def unpin(self, key):
        self.order[key] = None

    def remove(self, key):
        self.order.pop(key, None)

    def victim(self):
        return self.order.popitem(last=True)[0] if self.order else None

    def __len__(self):
        return len(self.order)


class EveryOther(AdmissionPolicy):
    def __init__(self, phase=0):
        self.phase = int(phase)

    def admit(self, keys, priorities=None):
        return [(i + self.phase) % 2 == 0 for i in range(len(keys))]


@hookimpl
def kvbm_register_policies(registry):
    registry.add("mru", kind="eviction", factory="acme_policies.plugin:MRUPolicy",
                 description="most recently used first")
    registry.add("every_other", kind="admission", factory="acme_policies.plugin:EveryOther",
                 description="admit every other block")
'''


@pytest.fixture
def acme(tmp_path: Path) -> Iterator[Path]:
    """A real distribution, ``acme-policies``, installed in a directory on sys.path."""
    make_distribution(tmp_path, "acme-policies", "acme_policies", "acme", THIRD_PARTY)
    with on_sys_path(tmp_path, "acme_policies") as root:
        yield root


def test_every_policy_of_the_issue_is_registered() -> None:
    reg = build_plugins().policies
    ours = {(e.kind, e.name) for e in reg if e.plugin.name == "policies"}
    assert ours == {("eviction", "lfu"), ("eviction", "priority"), ("eviction", "arc"),
                    ("eviction", "s3fifo"), ("eviction", "lirs"), ("eviction", "wtinylfu"),
                    ("eviction", "prefix"), ("eviction", "adaptive"), ("eviction", "learned"),
                    ("admission", "frequency"), ("admission", "priority_prefix"),
                    ("admission", "tinylfu"), ("admission", "reuse")}
    assert reg.get_kind("eviction", "lru").plugin.name == "builtin"


def test_third_party_policy_and_filter_are_registered_from_their_distribution(acme: Path) -> None:
    plugins = build_plugins()
    mru = plugins.policies.get_kind("eviction", "mru")
    every = plugins.policies.get_kind("admission", "every_other")
    assert mru.plugin.distribution == every.plugin.distribution == "acme-policies"


def test_third_party_policy_and_filter_are_usable_from_yaml(acme: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "chain.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model: {SMALL_MODEL}
        page_size: {PAGE}
        tiers:
          - {{type: host, num_blocks: 2, policy: mru, admission: every_other,
              admission_options: {{phase: 0}}}}
    """))
    with KvBlockManager.from_config(cfg, plugins=build_plugins()) as mgr:
        rt = mgr.chain[0]
        assert type(rt.registry.policy).__name__ == "MRUPolicy"
        assert type(rt.admission).__name__ == "EveryOther"
        hashes = mgr.hash_tokens(list(range(6 * PAGE)))
        src = ContiguousBlocks(
            np.random.default_rng(0).integers(0, 256, (6, mgr.block_bytes), dtype=np.uint8), mgr.layout)
        res = mgr.offload(hashes[:4], src)
        assert (res.stored, res.rejected) == (2, 2)  # blocks 0 and 2 admitted
        res = mgr.offload(hashes[4:], src, indices=[4, 5])
        assert (res.stored, res.rejected) == (1, 1)  # block 4 admitted
        # Most recently used first: block 2 made room for block 4 (LRU would drop 0).
        assert {h for h, _ in rt.registry.registered()} == {hashes[0], hashes[4]}
