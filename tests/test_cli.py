"""The kvbm command: plugins, config check and bench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbm.cli import main

from conftest import SMALL_MODEL


def test_plugins_lists_host_tier_as_available(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("host "))
    assert "tier" in line and "kvbm" in line and "available" in line


def test_plugins_json_has_name_kind_distribution_version_status(capsys: pytest.CaptureFixture[str]) -> None:
    main(["plugins", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert {"name", "kind", "distribution", "version", "status"} <= set(rows[0])


def test_config_check_prints_capacities_in_blocks_and_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {SMALL_MODEL}\npage_size: 4\ntiers: [{{type: host, capacity: 64KiB}}]\n")
    assert main(["config", "check", str(p)]) == 0
    out = capsys.readouterr().out
    assert "tier 0 'host' (host): 64 blocks, 64.00KiB" in out


def test_config_check_reports_errors_in_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("tiers: [{type: host, capacity: -1}]\n")
    assert main(["config", "check", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvbm: error: tier 'host'") and "\n" not in err


def test_bench_json_verifies_every_onboarded_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model: {num_layers: 4, num_kv_heads: 2, head_dim: 64, dtype: bfloat16}\n"
                 "page_size: 16\ntiers: [{type: host, num_blocks: 64}]\n")
    assert main(["bench", "--config", str(p), "--json", "--users", "2", "--rounds", "3",
                 "--system-tokens", "256", "--raw-blocks", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified_blocks"] > 0 and report["mismatched_blocks"] == 0
    assert 0 < report["hit_rate"] < 1
    for name in ("offload:host", "onboard:host"):
        assert report["paths"][name]["gbps"] > 0 and report["paths"][name]["limit_gbps"] > 0
