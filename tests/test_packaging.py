"""Packaging: every pip hint kvbm prints names an extra that installs what it is about,
and the sdist and wheel carry what a user needs (built here, offline, from a copy of
the tree: the sdist first, then the wheel from the unpacked sdist, as pip does)."""

from __future__ import annotations

import functools
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

from kvbm.plugins import build_plugins

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
#: The top-level packages of the distribution.
PACKAGES = sorted(p.name for p in ROOT.iterdir()
                  if p.is_dir() and p.name.startswith("kvbm") and (p / "__init__.py").is_file())
#: "pip install 'DIST[EXTRA,...]'" as the source prints it.
HINT = re.compile(r"pip install '([A-Za-z0-9_.-]+)\[([a-z0-9_,-]+)\]'")
#: What each extra a hint names is about: the modules it must make importable.
HINTED_MODULES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "gpu": ("torch",),
    "disk": (),
    "fs": (),
    "s3": ("boto3",),
    "remote": ("nixl", "zmq", "msgpack"),
    "hf": ("torch", "transformers"),
    "vllm": ("torch", "vllm"),
    "metrics": ("prometheus_client", "zmq", "msgpack"),
    "plot": ("matplotlib",),
    "test": ("moto",),  # kvbm bench --local s3 runs moto's server
}
#: Distributions of modules that may not be installed here (the rest are looked up).
KNOWN_DISTS = {"tensorrt_llm": "tensorrt-llm", "zmq": "pyzmq", "sglang": "sglang"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _canon(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0])


def _extra_dists(extra: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """The distributions ``kvbm[extra]`` installs, its ``kvbm[...]`` references followed."""
    out: set[str] = set()
    for req in EXTRAS[extra]:
        m = re.fullmatch(r"kvbm\[([a-z0-9_,-]+)\]", req.strip())
        if m:
            for sub in m.group(1).split(","):
                if sub not in seen:
                    out |= _extra_dists(sub, seen | {extra})
        else:
            out.add(_req_name(req))
    return out


@functools.cache
def _installed_dists() -> dict[str, list[str]]:
    return dict(md.packages_distributions())


def _dist_of(module: str) -> str:
    dists = _installed_dists().get(module)
    if dists:
        return _canon(dists[0])
    return _canon(KNOWN_DISTS.get(module, module))


def _source_hints() -> Iterator[tuple[str, str, str]]:
    """(file, distribution, extra) of every pip hint in the packages' source."""
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for m in HINT.finditer(path.read_text()):
                if m.group(1).startswith("__"):
                    continue  # the plugin template's placeholder for its own distribution
                for extra in m.group(2).split(","):
                    yield str(path.relative_to(ROOT)), m.group(1), extra


def test_the_source_prints_pip_hints() -> None:
    # The hints the next tests check are found at all (a regex gone wrong finds none).
    assert {e for _, _, e in _source_hints()} >= {"s3", "metrics", "remote", "vllm"}


@pytest.mark.parametrize("where,dist,extra", sorted(set(_source_hints())))
def test_every_pip_hint_in_the_source_names_an_extra_of_kvbm(where: str, dist: str, extra: str) -> None:
    assert dist == "kvbm" and extra in EXTRAS, f"{where}: pip install '{dist}[{extra}]'"


@pytest.mark.parametrize("extra", sorted({e for _, _, e in _source_hints()}))
def test_every_hinted_extra_installs_the_modules_it_is_about(extra: str) -> None:
    assert extra in HINTED_MODULES, f"say in HINTED_MODULES which modules kvbm[{extra}] is about"
    missing = {_dist_of(m) for m in HINTED_MODULES[extra]} - _extra_dists(extra)
    assert not missing, f"kvbm[{extra}] does not install {sorted(missing)}"


def _registered() -> list[object]:
    plugins = build_plugins()
    out = []
    for reg in (plugins.tiers, plugins.policies, plugins.layouts, plugins.connectors,
                plugins.commands):
        for e in reg:
            if e.plugin.distribution == "kvbm" and e.extra:
                what = f"{e.kind} {e.name}"
                out.append(pytest.param(what, e.extra, e.requires, id=what))
    return out


@pytest.mark.parametrize("what,extra,requires", _registered())
def test_every_registered_extra_installs_the_modules_its_entry_requires(
    what: str, extra: str, requires: tuple[str, ...]
) -> None:
    assert extra in EXTRAS, f"{what}: hint pip install 'kvbm[{extra}]' names no extra"
    missing = {_dist_of(m) for m in requires} - _extra_dists(extra)
    assert not missing, f"{what} requires {requires}; kvbm[{extra}] does not install {sorted(missing)}"


def test_all_installs_every_extra_but_the_engines_and_the_test_tools() -> None:
    left_out = {"vllm", "trtllm", "test"}
    want = set().union(*(_extra_dists(e) for e in EXTRAS if e not in left_out | {"all"}))
    assert "nixl" in _extra_dists("all")  # remote
    assert not want - _extra_dists("all"), sorted(want - _extra_dists("all"))


def test_the_vllm_extra_installs_vllm_itself() -> None:
    assert {"vllm", "torch"} <= _extra_dists("vllm")


def test_the_build_backend_supports_spdx_license_expressions() -> None:
    # PEP 639 (license = "Apache-2.0", license-files) needs setuptools 77 or later.
    (req,) = [r for r in PYPROJECT["build-system"]["requires"] if _req_name(r) == "setuptools"]
    m = re.search(r">=\s*(\d+)", req)
    assert m and int(m.group(1)) >= 77, req
    assert PYPROJECT["project"]["license"] == "Apache-2.0"


# -- the built sdist and wheel --------------------------------------------------------
_SKIP = shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist", "bench-out")


def _build(kind: str, src: Path, out: Path) -> Path:
    code = (f"import sys; from setuptools import build_meta as b; "
            f"print(b.build_{kind}(sys.argv[1]))")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(out)], cwd=src,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel): the sdist from a copy of the tree, the wheel from that sdist."""
    tmp = tmp_path_factory.mktemp("dist")
    shutil.copytree(ROOT, tmp / "tree", ignore=_SKIP)
    # A JSON file in a package (as the Grafana dashboard is) must ship as package data.
    (tmp / "tree" / "kvbm" / "_probe.json").write_text("{}")
    sdist = _build("sdist", tmp / "tree", tmp / "out")
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    return sdist, _build("wheel", unpacked, tmp / "out")


def _sdist_files(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as tf:
        return {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}


def _wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


@pytest.mark.slow
def test_the_sdist_carries_what_the_readme_commands_and_readers_need(built: tuple[Path, Path]) -> None:
    files = _sdist_files(built[0])
    want = {"Makefile", "README.md", "LICENSE", "MANIFEST.in", "pyproject.toml",
            "docs/benchmarks.md"}
    want |= {str(p.relative_to(ROOT)) for p in (ROOT / "requirements").glob("*.txt")}
    want |= {str(p.relative_to(ROOT)) for p in ROOT.glob("dashboards/*.json")}
    want |= {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")}
    assert not want - files, sorted(want - files)


@pytest.mark.slow
def test_every_package_ships_py_typed(built: tuple[Path, Path]) -> None:
    assert len(PACKAGES) > 10
    for pkg in PACKAGES:
        assert (ROOT / pkg / "py.typed").is_file(), f"{pkg}/py.typed missing in the tree"
    files = _wheel_files(built[1])
    assert not {f"{pkg}/py.typed" for pkg in PACKAGES} - files


@pytest.mark.slow
def test_the_wheel_ships_every_data_file_of_the_packages(built: tuple[Path, Path]) -> None:
    # py.typed, YAML and JSON (dashboards) under the packages are package data.
    data = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
            if p.is_file() and (p.name == "py.typed" or p.suffix in (".yaml", ".json"))
            and "__pycache__" not in p.parts}
    data.add("kvbm/_probe.json")
    assert not data - _wheel_files(built[1]), sorted(data - _wheel_files(built[1]))


@pytest.mark.slow
def test_the_wheel_declares_an_spdx_license_and_carries_its_text(built: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(built[1]) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(info).decode())
        text = zf.read(info.replace("METADATA", "licenses/LICENSE")).decode()
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["License-File"] == "LICENSE" and meta["License"] is None
    assert "Apache License" in text and "Version 2.0, January 2004" in text


@pytest.mark.slow
def test_the_wheel_declares_every_plugin_entry_point(built: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(built[1]) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = zf.read(name).decode()
    for ep, target in PYPROJECT["project"]["entry-points"]["kvbm.plugins"].items():
        assert f"{ep} = {target}" in text
