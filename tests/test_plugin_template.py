"""``kvbm plugin new``: the template builds as a distribution of its own, installs, and
runs a chain; a missing requirement of a third-party plugin names that distribution.

Each template is built into a wheel offline (no build isolation), installed with
``pip install --no-deps --target`` into a throwaway folder, and used from a
subprocess whose PYTHONPATH holds that folder: kvbm finds it through its entry point,
as it would in a user's environment, and .venv is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvbm.cli import main

NAME = "tmpltier"
DIST = "kvbm-tmpltier"
PKG = "kvbm_tmpltier"
MISSING = "kvbm_module_that_is_not_installed"


def _build_and_install(root: Path, tmp: Path) -> Path:
    """Wheel of the template at ``root``, installed into ``tmp/site``; that folder."""
    wheels, site = tmp / "wheels", tmp / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "--no-input"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PIP_NO_INDEX": "1"}
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(root)], check=True, capture_output=True, env=env, cwd=tmp, timeout=120)
    (wheel,) = wheels.glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, env=env, cwd=tmp, timeout=120)
    return site


def _template(tmp: Path, requires: str | None = None) -> Path:
    """``kvbm plugin new``, optionally declaring ``requires``, built and installed."""
    root = tmp / "src"
    assert main(["plugin", "new", NAME, "--dir", str(root)]) == 0
    if requires is not None:
        plugin = root / PKG / "plugin.py"
        text = plugin.read_text()
        assert "REQUIRES: tuple[str, ...] = ()" in text
        plugin.write_text(text.replace("REQUIRES: tuple[str, ...] = ()",
                                       f"REQUIRES: tuple[str, ...] = ({requires!r},)"))
    return _build_and_install(root, tmp)


def _run(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template, as written, installed into a throwaway folder."""
    return _template(tmp_path_factory.mktemp("template"))


CHAIN = """
import numpy as np
import __PKG__
from kvbm import ContiguousBlocks, KvBlockManager

assert __PKG__.__file__.startswith(__SITE__), __PKG__.__file__  # the wheel, not the source
model = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "float32"}
# Two host slots above it: most blocks are written to and read from the plugin's tier.
cfg = {"model": model, "page_size": 4,
       "tiers": [{"type": "host", "num_blocks": 2}, {"type": "__NAME__", "num_blocks": 16}]}
with KvBlockManager.from_config(cfg) as mgr:
    print("dist", mgr.plugins.tiers.get("__NAME__").plugin.distribution)
    rng = np.random.default_rng(7)
    hashes = mgr.hash_tokens(rng.integers(0, 1000, 6 * 4))
    data = rng.integers(0, 256, (6, mgr.block_bytes), dtype=np.uint8)
    for i in range(0, 6, 2):  # in pairs, so the host tier evicts to the plugin's tier
        mgr.offload(hashes[i:i + 2], ContiguousBlocks(data, mgr.layout), indices=[i, i + 1])
        mgr.flush()
    out = np.zeros_like(data)
    with mgr.match_prefix(hashes) as m:
        tiers = list(m.tiers)
        loaded = mgr.onboard(m, ContiguousBlocks(out, mgr.layout)).loaded
    print("tiers", ",".join(tiers))
    print("loaded", loaded, "equal", bool(np.array_equal(out, data)))
"""


@pytest.mark.slow
def test_the_template_installed_as_a_distribution_round_trips_blocks_through_a_chain(
    installed: Path, tmp_path: Path
) -> None:
    code = CHAIN.replace("__PKG__", PKG).replace("__NAME__", NAME).replace("__SITE__", repr(str(installed)))
    r = _run(installed, code, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"dist {DIST}" in lines
    tiers = next(ln for ln in lines if ln.startswith("tiers ")).split()[1].split(",")
    assert tiers.count(NAME) >= 4, tiers  # the blocks came back from the plugin's tier
    assert "loaded 6 equal True" in lines


@pytest.mark.slow
def test_the_templates_own_tests_pass_against_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    tests = installed.parent / "src" / "tests"
    r = _run(installed, f"import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
                        f"{str(tests)!r}]))", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 passed" in r.stdout


@pytest.mark.slow
def test_a_third_party_plugins_missing_requirement_names_its_own_distribution(tmp_path: Path) -> None:
    site = _template(tmp_path, requires=MISSING)
    r = _run(site, f'''
        from kvbm import KvBlockManager, PluginError
        from kvbm.cli import main
        main(["plugins"])
        try:
            KvBlockManager.from_config({{"model": {{"name": "tiny", "num_layers": 2,
                "num_kv_heads": 2, "head_dim": 8, "dtype": "float32"}},
                "tiers": [{{"type": "{NAME}", "num_blocks": 4}}]}})
        except PluginError as e:
            print("ERROR", e)
        ''', tmp_path)
    assert r.returncode == 0, r.stderr
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"{NAME} "))
    hint = f"pip install '{DIST}[client]'"
    assert DIST in row and f"unavailable: {hint}" in row
    error = next(ln for ln in r.stdout.splitlines() if ln.startswith("ERROR "))
    assert MISSING in error and hint in error and "kvbm[client]" not in error


def test_a_hookimpl_whose_name_is_no_hook_is_one_error_naming_the_hooks() -> None:
    import types

    from kvbm import PluginError, hookimpl
    from kvbm.plugins import build_plugins

    @hookimpl
    def kvbm_register_tier(registry: object) -> None:  # "tiers" misspelt
        pass

    typo = types.ModuleType("typo_plugin")
    typo.kvbm_register_tier = kvbm_register_tier  # type: ignore[attr-defined]
    with pytest.raises(PluginError) as e:
        build_plugins(extra_plugins=[typo])
    assert "plugin 'typo_plugin'" in str(e.value) and "'kvbm_register_tier'" in str(e.value)
    assert "kvbm_register_tiers" in str(e.value) and "\n" not in str(e.value)


def _readme_section() -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("## Writing a plugin\n")
    return text[start:text.index("\n## ", start + 3)]


def test_the_readmes_plugin_snippets_register_a_tier_with_the_real_api() -> None:
    import re
    import types

    import kvbm
    from kvbm.plugins import build_plugins

    section = _readme_section()
    tomllib = pytest.importorskip("tomllib")
    (toml,) = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert "kvbm.plugins" in tomllib.loads(toml)["project"]["entry-points"]
    register, config, tier = re.findall(r"```python\n(.*?)```", section, re.S)
    mod = types.ModuleType("readme_plugin")
    exec(config, mod.__dict__)  # the config model, as written
    exec(register.replace("from .config import MyTierConfig\n", ""), mod.__dict__)
    exec(tier, mod.__dict__)
    assert issubclass(mod.MyTierConfig, kvbm.TierConfig)
    # Every class attribute the README sets is one the core reads.
    declared = {n for n in vars(mod.MyTier) if not n.startswith("_")}
    assert declared and declared <= set(dir(kvbm.Tier)), declared - set(dir(kvbm.Tier))
    entry = build_plugins(extra_plugins=[mod]).tiers.get("mytier")  # registered: decorated
    assert entry.config_model is mod.MyTierConfig and entry.order == 5
    assert entry.extra == "client" and "MYTIER_GB" in entry.env


def test_the_readme_section_names_what_a_working_tier_plugin_needs() -> None:
    section = _readme_section()
    for needed in ("kvbm plugin new", "@kvbm.hookimpl", "kvbm.TierConfig", "slot",
                   "16-byte `bytes`", "1-D `uint8` numpy", "threads", "lock", "shared",
                   "default_admission", "kind", "medium", "[project.entry-points.\"kvbm.plugins\"]"):
        assert needed in section, needed
