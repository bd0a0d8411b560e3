"""Plugin discovery, registration conflicts and third-party tier types."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from distributions import make_distribution, on_sys_path

from kvbm import ContiguousBlocks, KvBlockManager, PluginError, hookspecs
from kvbm.plugins import DEFAULT_PLUGINS, build_plugins

from conftest import PAGE, SMALL_MODEL

BUILTINS = [m.rsplit(".", 1)[-1] for m in DEFAULT_PLUGINS]

THIRD_PARTY_TIER = '''
"""A third party's tier: blocks in a dict (what a user would publish as a package)."""
from kvbm import hookimpl, Tier, TierConfig
from typing import Literal
import numpy as np


class DictTierConfig(TierConfig):
    type: Literal["dict"] = "dict"
    label: str = "x"


class DictTier(Tier):
    kind = "dict"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.store = {}

    def write(self, slots, keys, src):
        for s, b in zip(slots, src):
            self.store[s] = bytes(b)
        return [True] * len(slots)

    def read(self, slots, keys, dst):
        out = []
        for s, d in zip(slots, dst):
            if s in self.store:
                d[:] = np.frombuffer(self.store[s], dtype=np.uint8)
                out.append(True)
            else:
                out.append(False)
        return out


@hookimpl
def kvbm_register_tiers(registry):
    registry.add("dict", factory="{pkg}.plugin:DictTier", config_model=DictTierConfig)
'''


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    """A directory on sys.path where tests install distributions."""
    with on_sys_path(tmp_path, "thirdparty") as root:
        yield root


def test_builtin_plugins_load_before_entry_points_sorted_by_name() -> None:
    names = [p.name for p in build_plugins().plugins]
    assert names[0] == "builtin"
    rest = names[len(DEFAULT_PLUGINS):]
    assert rest == sorted(rest)


def test_every_plugin_registers_through_the_entry_point_group() -> None:
    dists = {p.name: p.distribution for p in build_plugins().plugins}
    for name in ("host", "disk", "s3", "gpu", "remote", "policies", "observability", "bench", "hf",
                 "sglang", "vllm", "trtllm"):
        assert dists[name] == "kvbm"


def test_third_party_tier_type_is_usable_from_yaml(site: Path, tmp_path: Path) -> None:
    make_distribution(site, "kvbm-dict-tier", "thirdparty_dict", "dict", THIRD_PARTY_TIER)
    cfg = tmp_path / "chain.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model: {SMALL_MODEL}
        page_size: {PAGE}
        tiers:
          - {{type: host, num_blocks: 2}}
          - {{type: dict, num_blocks: 8, label: mine}}
    """))
    with KvBlockManager.from_config(cfg) as mgr:
        assert [rt.config.type for rt in mgr.chain] == ["host", "dict"]
        hashes = mgr.hash_tokens(list(range(4 * PAGE)))
        src = np.random.default_rng(0).integers(0, 256, (4, mgr.block_bytes), dtype=np.uint8)
        mgr.offload(hashes, ContiguousBlocks(src, mgr.layout))
        mgr.flush()
        # The host tier holds 2; the 2 it has no slot for go straight to the dict tier.
        assert mgr.stats()["tiers"]["dict"]["used_blocks"] == 4
        plugin = next(p for p in mgr.plugins.plugins if p.name == "dict")
        assert plugin.distribution == "kvbm-dict-tier"


def test_same_name_from_two_distributions_is_an_error_naming_both(site: Path) -> None:
    make_distribution(site, "kvbm-dict-a", "thirdparty_a", "dict", THIRD_PARTY_TIER)
    make_distribution(site, "kvbm-dict-b", "thirdparty_b", "dict2", THIRD_PARTY_TIER)
    with pytest.raises(PluginError) as e:
        build_plugins()
    assert "kvbm-dict-a" in str(e.value) and "kvbm-dict-b" in str(e.value)


def test_same_distribution_and_name_seen_twice_loads_once(site: Path) -> None:
    make_distribution(site, "kvbm-dict-tier", "thirdparty_dict", "dict", THIRD_PARTY_TIER)
    sys.path.insert(0, str(site))  # the same distribution reached through two path entries
    try:
        plugins = build_plugins()
    finally:
        sys.path.remove(str(site))
    assert [p.name for p in plugins.plugins].count("dict") == 1


def test_disable_autoload_loads_only_builtins() -> None:
    plugins = build_plugins({"KVBM_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert [p.name for p in plugins.plugins] == BUILTINS
    assert "host" not in plugins.tiers


def test_disable_autoload_still_loads_plugins_named_in_kvbm_plugins() -> None:
    plugins = build_plugins({"KVBM_DISABLE_PLUGIN_AUTOLOAD": "1", "KVBM_PLUGINS": "host"})
    assert [p.name for p in plugins.plugins] == [*BUILTINS, "host"]


def test_kvbm_plugins_restricts_autoload_to_named_plugins() -> None:
    plugins = build_plugins({"KVBM_PLUGINS": "host,policies"})
    assert [p.name for p in plugins.plugins] == [*BUILTINS, "host", "policies"]


MISSING_EXTRA = '''
from kvbm import hookimpl, TierConfig

@hookimpl
def kvbm_register_tiers(registry):
    registry.add("tape", factory="{pkg}.plugin:Nope", extra="tape",
                 requires=("kvbm_package_that_is_not_installed",))
'''


def test_plugin_with_missing_package_lists_itself_unavailable_with_pip_command(site: Path) -> None:
    make_distribution(site, "kvbm-tape", "thirdparty_tape", "tape", MISSING_EXTRA)
    entry = build_plugins().tiers.get("tape")
    assert not entry.available
    assert entry.install_hint == "pip install 'kvbm-tape[tape]'"


def test_chain_naming_unavailable_plugin_fails_at_start_with_pip_command(site: Path) -> None:
    make_distribution(site, "kvbm-tape", "thirdparty_tape", "tape", MISSING_EXTRA)
    with pytest.raises(PluginError, match=r"pip install 'kvbm-tape\[tape\]'"):
        KvBlockManager.from_config({"model": SMALL_MODEL, "tiers": [{"type": "tape", "num_blocks": 4}]})


def test_listing_plugins_imports_no_torch_or_boto3() -> None:
    code = ("import sys; from kvbm.cli import main; main(['plugins']);"
            "print('HEAVY', [m for m in ('torch', 'boto3', 'nixl', 'transformers', 'vllm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_importing_kvbm_builds_no_plugin_manager() -> None:
    code = "import pluggy, kvbm; print(pluggy.PluginManager.__init__.__qualname__)"
    code = ("import pluggy\ncalls=[]\norig=pluggy.PluginManager.__init__\n"
            "def spy(self,*a,**k):\n    calls.append(1); orig(self,*a,**k)\n"
            "pluggy.PluginManager.__init__=spy\nimport kvbm, kvbm.manager\nprint('BUILT', len(calls))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "BUILT 0" in out


HOOKS = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("kvbm_")]


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_spec_has_a_docstring_saying_when_it_is_called(name: str) -> None:
    doc = getattr(hookspecs, name).__doc__ or ""
    assert "Called" in doc and "Returns" in doc


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_spec_is_exercised_by_a_test(name: str) -> None:
    here = Path(__file__).parent
    used = any(name in p.read_text() for p in here.glob("test_*.py") if p.name != "test_plugins.py")
    used = used or name in THIRD_PARTY_TIER + MISSING_EXTRA
    assert used, f"hook {name} has no test"


CORE = Path(__file__).resolve().parents[1] / "kvbm"
# Import paths users type, kept in the core as the plugin modules under their old names.
REEXPORTS = {"kv_events.py", "connectors/hf.py", "connectors/sglang.py",
             "connectors/vllm.py", "vllm_integration/connector.py",
             "trtllm_integration/connector.py"}
TIER_TYPES = {"gpu", "host", "disk", "s3", "remote"}


def _core_modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(CORE.rglob("*.py")):
        yield str(path.relative_to(CORE)), ast.parse(path.read_text())


def test_the_core_imports_no_plugin_package() -> None:
    bad = []
    for rel, tree in _core_modules():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            for name in names:
                plugin = name.startswith("kvbm_")
                if plugin and (rel not in REEXPORTS or name.startswith(("kvbm_tiers", "kvbm_policies"))):
                    bad.append(f"{rel}:{node.lineno} imports {name}")
    assert not bad, bad


def test_the_core_compares_no_tier_type_name() -> None:
    # A tier type named in a comparison, a set or tuple, a mapping key or a "type" entry
    # is knowledge the tier's class or plugin should declare instead.
    bad = []
    for rel, tree in _core_modules():
        for node in ast.walk(tree):
            consts: list[ast.expr] = []
            if isinstance(node, ast.Compare):
                consts = [node.left, *node.comparators]
                consts += [e for c in node.comparators if isinstance(c, (ast.Set, ast.Tuple, ast.List))
                           for e in c.elts]
            elif isinstance(node, ast.Dict):
                consts = [k for k in node.keys if k is not None]
                consts += [v for k, v in zip(node.keys, node.values)
                           if isinstance(k, ast.Constant) and k.value == "type"]
            for c in consts:
                if isinstance(c, ast.Constant) and c.value in TIER_TYPES:
                    bad.append(f"{rel}:{c.lineno} names tier type {c.value!r}")
    assert not bad, bad
