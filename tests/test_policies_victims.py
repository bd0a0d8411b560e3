"""Every policy's victims, pinned down: a speed-up must not change a single choice.

The digests are of the victim sequence (and the hit and eviction counts) of each
policy replayed on two workload families at a quarter and a sixteenth of the working
set, recorded from the policies before they were rewritten for speed (commit dc7e117)
and checked equal after. A change that moves one victim fails here; a deliberate
change of a policy's behaviour updates the table, and says so in its commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from kvbm.policy import EvictionPolicy, LRUPolicy
from kvbm_policies import (
    AdaptivePolicy,
    ARCPolicy,
    LFUPolicy,
    LIRSPolicy,
    PrefixLRUPolicy,
    PriorityLRUPolicy,
    S3FIFOPolicy,
    WTinyLFUPolicy,
)
from kvbm_policies.families import make_workload
from kvbm_policies.replay import replay
from kvbm_policies.workloads import Trace
from kvbm_policies.wrap import ForwardingPolicy

POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": LRUPolicy, "lfu": LFUPolicy, "priority": PriorityLRUPolicy, "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy, "lirs": LIRSPolicy, "wtinylfu": WTinyLFUPolicy,
    "prefix": PrefixLRUPolicy, "adaptive": AdaptivePolicy,
    # Every candidate, a small sample and short periods: the leader switches often.
    "adaptive-all": lambda c: AdaptivePolicy(c, candidates="lru,lirs,arc,s3fifo,lfu,wtinylfu,prefix",
                                             rate=4, period=16, margin=0.0),
}

#: family/fraction/policy -> (hits, evictions, sha256 of repr(victims)[:16]), at dc7e117.
GOLDEN: dict[str, tuple[int, int, str]] = {
    "long-docs/16/adaptive": (18504, 61131, "8632325addf729c3"),
    "long-docs/16/adaptive-all": (18168, 61467, "1cdcb8e3d85831cb"),
    "long-docs/16/arc": (16320, 63315, "6abced8c4a244c74"),
    "long-docs/16/lfu": (16320, 63315, "6abced8c4a244c74"),
    "long-docs/16/lirs": (19876, 59759, "a82edfee1630f927"),
    "long-docs/16/lru": (16320, 63315, "6abced8c4a244c74"),
    "long-docs/16/prefix": (16320, 63315, "4032968c6f197133"),
    "long-docs/16/priority": (16320, 63315, "6abced8c4a244c74"),
    "long-docs/16/s3fifo": (16320, 63315, "6abced8c4a244c74"),
    "long-docs/16/wtinylfu": (16320, 63315, "6abced8c4a244c74"),
    "long-docs/4/adaptive": (44686, 29204, "8c71cadf36850827"),
    "long-docs/4/adaptive-all": (36263, 37276, "e30728b4c9ad4e25"),
    "long-docs/4/arc": (43090, 30695, "7851fac82a9e8d6f"),
    "long-docs/4/lfu": (37829, 36061, "225f525d5d343980"),
    "long-docs/4/lirs": (43445, 30445, "2889064d56a8c8e1"),
    "long-docs/4/lru": (24400, 49490, "cac3543a2f4d9248"),
    "long-docs/4/prefix": (24400, 49490, "a2eecb161e82c80e"),
    "long-docs/4/priority": (24400, 49490, "cac3543a2f4d9248"),
    "long-docs/4/s3fifo": (43356, 30459, "2068505341b2cda6"),
    "long-docs/4/wtinylfu": (38915, 34973, "605a6252acfe1ac8"),
    "multi-turn/16/adaptive": (19487, 40747, "a688f2df9378f7fb"),
    "multi-turn/16/adaptive-all": (19811, 40633, "51be4655838ed33b"),
    "multi-turn/16/arc": (16320, 44159, "c9d28786a749970f"),
    "multi-turn/16/lfu": (16320, 44159, "c9d28786a749970f"),
    "multi-turn/16/lirs": (19890, 40589, "045a7c07e2f1327d"),
    "multi-turn/16/lru": (16320, 44159, "c9d28786a749970f"),
    "multi-turn/16/prefix": (16320, 44159, "54143188156429c5"),
    "multi-turn/16/priority": (16320, 44159, "c9d28786a749970f"),
    "multi-turn/16/s3fifo": (17280, 43199, "44a6cc3c033946cb"),
    "multi-turn/16/wtinylfu": (16320, 44159, "c9d28786a749970f"),
    "multi-turn/4/adaptive": (30425, 28140, "499a4ae0370276a8"),
    "multi-turn/4/adaptive-all": (23595, 34884, "a6318806c62eaa3a"),
    "multi-turn/4/arc": (25577, 31488, "a952d1b54f54edd6"),
    "multi-turn/4/lfu": (21871, 36694, "66298c27615f44d3"),
    "multi-turn/4/lirs": (30750, 27815, "038c61206eeb0ffd"),
    "multi-turn/4/lru": (17696, 40869, "6f35479990d9527d"),
    "multi-turn/4/prefix": (17696, 40869, "02b95103e638bd3a"),
    "multi-turn/4/priority": (17696, 40869, "6f35479990d9527d"),
    "multi-turn/4/s3fifo": (25749, 30578, "869de840e5737690"),
    "multi-turn/4/wtinylfu": (24615, 33949, "f4efa2921f8db0d8"),
}


class VictimLog(ForwardingPolicy):
    """Passes every call on, records each victim, and offers ``prepare_keys`` when the
    policy has it, so that the replay takes the same path as without the wrapper."""

    def __init__(self, inner: EvictionPolicy) -> None:
        super().__init__(inner)
        self.victims: list[Any] = []
        prepare = getattr(inner, "prepare_keys", None)
        if prepare is not None:
            self.prepare_keys = prepare

    def victim(self) -> Any:
        v = super().victim()
        self.victims.append(v)
        return v


_TRACES: dict[str, Trace] = {}


def _trace(family: str) -> Trace:
    if family not in _TRACES:
        _TRACES[family] = make_workload(family)
    return _TRACES[family]


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_policy_picks_the_same_victims_as_before_the_speed_work(case: str) -> None:
    family, frac, name = case.split("/")
    trace = _trace(family)
    cap = trace.working_set // int(frac)
    log = VictimLog(POLICIES[name](cap))
    r = replay(trace, log, cap, name)
    digest = hashlib.sha256(repr(log.victims).encode()).hexdigest()[:16]
    assert (r.hits, r.evictions, digest) == GOLDEN[case]
