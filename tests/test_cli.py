"""The kvbm command: plugins, config check and bench."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributions import make_distribution, on_sys_path

from kvbm.cli import main

from conftest import SMALL_MODEL

HELLO_COMMAND = '''
"""A third party's subcommand: ``kvbm hello --name NAME``."""
from kvbm import hookimpl


@hookimpl
def kvbm_register_commands(registry):
    registry.add("hello", factory="{pkg}.command:hello", description="say hello")
    registry.add("tape-report", factory="{pkg}.command:hello", extra="tape",
                 requires=("kvbm_package_that_is_not_installed",), description="needs tape")
'''

HELLO_FACTORY = '''
import sys

sys.modules.setdefault("hello_factory_imported", sys)


def hello(parser):
    parser.add_argument("--name", default="world")

    def run(args):
        print(f"hello {args.name}")
        return 3

    return run
'''


@pytest.fixture
def hello(tmp_path: Path) -> Iterator[Path]:
    """A distribution on sys.path whose plugin adds ``kvbm hello``."""
    with on_sys_path(tmp_path, "thirdparty_hello") as root:
        make_distribution(root, "kvbm-hello", "thirdparty_hello", "hello", HELLO_COMMAND)
        (root / "thirdparty_hello" / "command.py").write_text(HELLO_FACTORY)
        yield root
    sys.modules.pop("hello_factory_imported", None)


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


def test_a_plugin_adds_a_subcommand_through_kvbm_register_commands(
    hello: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["hello", "--name", "kvbm"]) == 3
    assert capsys.readouterr().out == "hello kvbm\n"


def test_a_subcommands_module_is_imported_only_when_it_runs(
    hello: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plugins"]) == 0
    rows = capsys.readouterr().out
    assert "hello_factory_imported" not in sys.modules
    line = next(ln for ln in rows.splitlines() if ln.startswith("hello "))
    assert "command" in line and "kvbm-hello" in line and "available" in line


def test_a_subcommand_missing_its_packages_says_the_pip_command(
    hello: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tape-report"]) == 2
    assert "pip install 'kvbm[tape]'" in capsys.readouterr().err


def test_bench_and_simulate_come_from_their_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    main(["plugins", "--json"])
    rows = {(r["name"], r["kind"]): r for r in json.loads(capsys.readouterr().out)}
    assert rows[("bench", "command")]["plugin"] == "bench"
    assert rows[("simulate", "command")]["plugin"] == "policies"


def test_help_lists_every_subcommand_without_importing_them() -> None:
    code = ("import sys\nfrom kvbm.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print('LOADED', [m for m in ('kvbm_bench.cli', 'kvbm_policies.simulate') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "bench" in out and "simulate" in out and "LOADED []" in out
