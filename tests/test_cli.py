"""The kvbm command: plugins, config check and bench."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
                 "--system-tokens", "256", "--raw-blocks", "16", "--no-out"]) == 0
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
    assert "pip install 'kvbm-hello[tape]'" in capsys.readouterr().err


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


# -- config check --probe ---------------------------------------------------------------------
def _chain_yaml(tmp_path: Path, *tiers: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {SMALL_MODEL}\npage_size: 4\ntiers:\n"
                 + "".join(f"  - {t}\n" for t in tiers))
    return p


def _probe_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("probe ")]


def test_probe_makes_writes_and_removes_a_file_in_each_disk_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    f = _chain_yaml(tmp_path, f"{{type: disk, num_blocks: 8, path: [{a}, {b}]}}")
    assert main(["config", "check", "--probe", str(f)]) == 0
    lines = _probe_lines(capsys.readouterr().out)
    for d in (a, b):
        assert (f"probe ok: tier 'disk': path '{d}': a file was created, written, read back and "
                "removed (O_DIRECT)") in lines
        assert list(d.iterdir()) == []


def test_probe_of_a_missing_disk_path_says_it_will_be_made_and_makes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    f = _chain_yaml(tmp_path, f"{{type: disk, num_blocks: 8, path: {tmp_path}/new/cache}}")
    assert main(["config", "check", "--probe", str(f)]) == 0
    assert (f"probe ok: tier 'disk': path '{tmp_path}/new/cache': does not exist yet; kvbm will "
            f"create it in '{tmp_path}'") in _probe_lines(capsys.readouterr().out)
    assert not (tmp_path / "new").exists()


def test_probe_of_a_disk_path_under_a_file_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "file").write_text("x")
    f = _chain_yaml(tmp_path, f"{{type: disk, num_blocks: 8, path: {tmp_path}/file/cache}}")
    assert main(["config", "check", "--probe", str(f)]) == 2
    out = capsys.readouterr()
    assert _probe_lines(out.out) == [
        f"probe FAILED: tier 'disk': path '{tmp_path}/file/cache': does not exist, and "
        f"'{tmp_path}/file' is not a directory this user may create it in; create it or give "
        "another directory"]
    assert out.err == "kvbm: error: 1 probe(s) failed; see the lines above\n"


def test_config_check_without_probe_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    f = _chain_yaml(tmp_path, f"{{type: disk, num_blocks: 8, path: {tmp_path}/new}}")
    assert main(["config", "check", str(f)]) == 0
    assert not _probe_lines(capsys.readouterr().out) and not (tmp_path / "new").exists()


def test_probe_of_a_host_arena_above_the_memory_available_now_fails() -> None:
    from kvbm.config import ProbeContext
    from kvbm_tiers_host.config import HostTierConfig

    cfg = HostTierConfig(type="host", name="host", num_blocks=1)
    [r] = cfg.probe(ProbeContext("host", num_blocks=1 << 20, block_bytes=1 << 20))
    assert not r.ok and r.line.startswith("tier 'host': memory: 1.00TiB arena, ")
    assert r.line.endswith("does not fit; lower capacity or num_blocks (DYN_KVBM_CPU_CACHE_GB, "
                           "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS) or free memory")


@pytest.fixture(scope="module")
def moto() -> Iterator[Any]:
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    from s3server import MotoServer

    s = MotoServer()
    s.start()
    yield s
    s.stop()


def _s3_entry(url: str, bucket: str) -> str:
    return (f"{{type: s3, bucket: {bucket}, endpoint_url: '{url}', region: us-east-1, "
            "addressing_style: path, aws_access_key_id: AKIA, aws_secret_access_key: s}")


def test_probe_heads_each_bucket_with_its_credentials(
    tmp_path: Path, moto: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    f = _chain_yaml(tmp_path, _s3_entry(moto.url, "kvbm-test"))
    assert main(["config", "check", "--probe", str(f)]) == 0
    [line] = _probe_lines(capsys.readouterr().out)
    assert line.startswith(f"probe ok: tier 's3': bucket 'kvbm-test' (s3://kvbm-test at "
                           f"{moto.url}): HEAD answered in ")
    assert line.endswith(" ms with these credentials")


def test_probe_of_a_missing_bucket_fails_naming_the_fix(
    tmp_path: Path, moto: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    f = _chain_yaml(tmp_path, _s3_entry(moto.url, "no-such-bucket"))
    assert main(["config", "check", "--probe", str(f)]) == 2
    assert _probe_lines(capsys.readouterr().out) == [
        f"probe FAILED: tier 's3': bucket 'no-such-bucket' (s3://no-such-bucket at {moto.url}): "
        "does not exist; create it or set create_bucket: true"]


def test_probe_of_a_server_that_never_answers_fails_within_its_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    import socket
    import time

    with socket.socket() as lsn:  # accepts connections (the kernel does) and never answers
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(8)
        url = f"http://127.0.0.1:{lsn.getsockname()[1]}"
        f = _chain_yaml(tmp_path, _s3_entry(url, "kv-cache"))
        t0 = time.monotonic()
        assert main(["config", "check", "--probe", "--timeout", "1", str(f)]) == 2
        assert time.monotonic() - t0 < 3.0
    assert _probe_lines(capsys.readouterr().out) == [
        f"probe FAILED: tier 's3': bucket 'kv-cache' (s3://kv-cache at {url}): no answer within "
        "1 s; check endpoint_url and that the server runs"]


def test_an_unexpected_error_is_one_line_and_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kvbm.cli

    def broken(args: Any) -> int:
        raise TypeError("a bug\nwith two lines")

    monkeypatch.setattr(kvbm.cli, "_cmd_plugins", broken)
    assert main(["plugins"]) == 3
    assert capsys.readouterr().err == (
        "kvbm: internal error: TypeError: a bug with two lines (run with -v for the traceback "
        "and please report it)\n")


def test_probe_makes_and_removes_a_record_in_the_rendezvous_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    peers = tmp_path / "peers"
    peers.mkdir()
    f = _chain_yaml(tmp_path, "{type: host, num_blocks: 4}",
                    f"{{type: remote, rendezvous_dir: {peers}}}")
    assert main(["config", "check", "--probe", str(f)]) == 0
    assert (f"probe ok: tier 'remote': rendezvous_dir '{peers}': a record file was created and "
            "removed") in _probe_lines(capsys.readouterr().out)
    assert list(peers.iterdir()) == []


def test_version_prints_kvbm_and_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"kvbm {importlib.metadata.version('kvbm')}\n"


def test_version_is_printed_even_when_a_plugin_fails_to_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with on_sys_path(tmp_path, "thirdparty_broken"):
        make_distribution(tmp_path, "kvbm-broken", "thirdparty_broken", "broken",
                          "raise ImportError('a broken plugin')\n")
        assert main(["plugins"]) == 2  # the plugin does break the other commands
        capsys.readouterr()
        assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("kvbm ")


def test_plugin_new_refuses_the_name_of_an_installed_tier_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plugin", "new", "host", "--dir", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err == (
        "kvbm: error: plugin name 'host': tier type 'host' exists already (plugin 'host' of "
        "distribution 'kvbm'); choose another name\n")
    assert not (tmp_path / "p").exists()


def test_plugin_new_refuses_a_name_that_cannot_be_a_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plugin", "new", "My-Tier", "--dir", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvbm: error: plugin name 'My-Tier': must be 1-40 lowercase") and "e.g. mytier" in err
    assert not (tmp_path / "p").exists()


def test_plugin_new_refuses_a_folder_that_is_not_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["plugin", "new", "mytier", "--dir", str(tmp_path)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_plugin_new_writes_a_distribution_with_its_entry_point_and_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tomllib = pytest.importorskip("tomllib")
    assert main(["plugin", "new", "mytier", "--dir", str(tmp_path / "p")]) == 0
    root = tmp_path / "p"
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "kvbm-mytier"
    assert meta["entry-points"]["kvbm.plugins"] == {"mytier": "kvbm_mytier.plugin"}
    assert "client" in meta["optional-dependencies"]
    for rel in ("kvbm_mytier/plugin.py", "kvbm_mytier/config.py", "kvbm_mytier/tier.py",
                "kvbm_mytier/py.typed", "tests/test_mytier.py", "README.md"):
        assert (root / rel).is_file(), rel
    plugin = (root / "kvbm_mytier" / "plugin.py").read_text()
    assert "@kvbm.hookimpl\ndef kvbm_register_tiers(" in plugin
    assert "class MytierTierConfig(TierConfig):" in (root / "kvbm_mytier" / "config.py").read_text()
    assert "kvbm-mytier" in capsys.readouterr().out


def test_config_check_shows_every_tiers_errors_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvbm.plugins import build_plugins

    p = tmp_path / "c.yaml"
    p.write_text("tiers:\n  - {type: host, capacity: 64MiB, copy_thread: 2}\n"
                 f"  - {{type: disk, capacity: 1GiB, path: '{tmp_path}', io_threds: 4}}\n"
                 "  - {type: nope}\n")
    assert main(["config", "check", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "kvbm: error: tier 'host' (type host): key 'copy_thread': unknown key; did you mean "
        "'copy_threads'?; tier 'disk' (type disk): key 'io_threds': unknown key; did you mean "
        "'io_threads'?; tier 'nope': key 'type': value 'nope' is not a known tier type; known: "
        + ", ".join(build_plugins().tiers.names()) + " (see `kvbm plugins`)")


@pytest.mark.parametrize("command", [["simulate"], ["bench"], ["config", "check"], ["plugins"]])
def test_help_names_no_path_of_this_machine(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: kvbm")
    for local in ("/work/", "/home/", "/tmp/", "/root/", str(Path.cwd()), str(Path.home())):
        assert local not in out, f"kvbm {' '.join(command)} --help shows {local!r}"
