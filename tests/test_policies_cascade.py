"""The write-through cascade past a refusing tier, and admission filters sized by their tier.

A block a tier's admission filter refuses is offered to the tier below it, copied
from the tier above (``Planner.bypass_refused``, the default): a disk filter that
saves SSD writes must not also starve the bucket below the disk. The chain hands a
filter that declares ``capacity`` its tier's size in blocks
(``kvbm.chain.admission_options``), so ``reuse``'s window defaults to twice the tier.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from test_manager import blocks, manager, onboard_all

from kvbm.chain import admission_options
from kvbm.policy import AdmissionPolicy
from kvbm_policies.admission import ReuseWindowFilter

# host on top, a middle "disk" whose filter refuses a block's first 1,000 offers, a
# bottom tier that admits all: 4 + 16 + 64 blocks.
_CHAIN = [{"type": "host", "name": "top", "num_blocks": 4},
          {"type": "host", "name": "disk", "num_blocks": 16, "admission": "reuse",
           "admission_options": {"offers": 1000}},
          {"type": "host", "name": "bucket", "num_blocks": 64}]


def _save_then_push_out_of_the_top(mgr: Any) -> tuple[list[bytes], np.ndarray]:
    hashes, src, data = blocks(mgr, 8)
    mgr.offload(hashes[:4], src)
    mgr.flush()
    mgr.offload(hashes[4:], src, indices=[4, 5, 6, 7])  # the top (4 blocks) drops the first 4
    mgr.flush()
    return hashes, data


def test_a_block_the_middle_tier_refuses_is_copied_from_the_top_to_the_tier_below_byte_exact() -> None:
    with manager(_CHAIN) as mgr:
        hashes, data = _save_then_push_out_of_the_top(mgr)
        assert mgr.chain[1].registry.evictions == 0
        assert not any(h in mgr.chain[1].registry for h in hashes), "the filter refused all"
        res, out, tiers = onboard_all(mgr, hashes[:4])
        assert tiers == ["bucket"] * 4
        assert res.loaded == 4 and np.array_equal(out, data[:4])


def test_without_bypass_a_refused_block_never_reaches_the_tier_below() -> None:
    # The negative control of the test above: the planner's older cascade.
    with manager(_CHAIN) as mgr:
        mgr.planner.bypass_refused = False
        hashes, _ = _save_then_push_out_of_the_top(mgr)
        res, _, tiers = onboard_all(mgr, hashes[:4])
        assert tiers == [] and res.loaded == 0
        assert mgr.planner.pins() == 0


def test_a_bypassed_copy_releases_its_source_pins() -> None:
    with manager(_CHAIN) as mgr:
        _save_then_push_out_of_the_top(mgr)
        assert mgr.planner.pins() == 0
        assert mgr.chain[2].registry.evictions == 0


class _Sized(AdmissionPolicy):
    def __init__(self, capacity: int, **options: Any) -> None:
        super().__init__()
        self.capacity = capacity

    def admit(self, keys: Any, priorities: Any = None) -> list[bool]:
        return [True] * len(keys)


class _Unsized(AdmissionPolicy):
    def __init__(self, threshold: int = 2) -> None:
        super().__init__()
        self.threshold = threshold

    def admit(self, keys: Any, priorities: Any = None) -> list[bool]:
        return [True] * len(keys)


def test_a_filter_declaring_capacity_gets_its_tiers_size_in_blocks() -> None:
    assert admission_options(_Sized, {"x": 1}, 512) == {"x": 1, "capacity": 512}
    assert _Sized(**admission_options(_Sized, {}, 512)).capacity == 512


def test_a_filter_without_capacity_gets_its_options_alone() -> None:
    kw = admission_options(_Unsized, {"threshold": 3}, 512)
    assert kw == {"threshold": 3}
    assert _Unsized(**kw).threshold == 3


def test_reuse_window_defaults_to_twice_the_tier_the_chain_builds_it_for() -> None:
    with manager([{"type": "host", "num_blocks": 4},
                  {"type": "host", "name": "disk", "num_blocks": 24, "admission": "reuse"}]) as mgr:
        adm = mgr.chain[1].admission
        assert isinstance(adm, ReuseWindowFilter) and adm.window == 48


@pytest.mark.parametrize(("window", "capacity", "expected"),
                         [("3x", 100, 300), ("0.5x", 100, 50), (77, 100, 77), (None, None, 1_000_000)])
def test_reuse_window_is_a_count_or_a_multiple_of_the_tier(window: Any, capacity: Any,
                                                           expected: int) -> None:
    assert ReuseWindowFilter(window=window, capacity=capacity).window == expected


@pytest.mark.parametrize(("window", "capacity", "message"),
                         [("2x", None, "built without one"), ("-1x", 10, "not a positive multiple"),
                          ("abcx", 10, "not a positive multiple")])
def test_reuse_window_multiple_errors_name_the_option_and_the_value(window: Any, capacity: Any,
                                                                     message: str) -> None:
    with pytest.raises(ValueError, match=message) as e:
        ReuseWindowFilter(window=window, capacity=capacity)
    assert "option 'window'" in str(e.value) and repr(window) in str(e.value)


def _chain_runs(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    from kvbm.cli import main

    rc = main(["simulate", "--users", "8", "--rounds", "4", "--chain", "host:1/16,disk:1/4,s3:1",
               "--admission", "all,reuse", "--json", *extra])
    assert rc == 0
    return {r["label"]: r for r in json.loads(capsys.readouterr().out)["runs"]}


def test_simulate_cascade_bypass_keeps_the_hits_a_disk_filter_would_take_from_the_bucket(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runs = _chain_runs(capsys, "--cascade", "stop,bypass")
    stop, bypass = runs["lru / reuse / stop"], runs["lru / reuse / bypass"]
    assert stop["tiers"][1]["written"] == bypass["tiers"][1]["written"], "same disk writes"
    assert bypass["tiers"][2]["hits"] > stop["tiers"][2]["hits"]
    assert bypass["hits"] > stop["hits"]
    assert bypass["tiers"][2]["written"] > stop["tiers"][2]["written"]


def test_simulate_cascade_is_the_planners_default_bypass(capsys: pytest.CaptureFixture[str]) -> None:
    plain = _chain_runs(capsys)
    bypass = _chain_runs(capsys, "--cascade", "bypass")
    assert plain["lru / reuse"]["hits"] == bypass["lru / reuse"]["hits"]


def test_simulate_cascade_names_a_bad_value(capsys: pytest.CaptureFixture[str]) -> None:
    from kvbm.cli import main

    assert main(["simulate", "--users", "2", "--rounds", "1", "--chain", "host:1/4,disk:1/2",
                 "--cascade", "sideways"]) == 2
    err = capsys.readouterr().err
    assert "--cascade" in err and "'sideways'" in err and "stop or bypass" in err
