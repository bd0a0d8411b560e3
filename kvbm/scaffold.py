"""``kvbm plugin new NAME``: a third-party tier plugin distribution to start from.

The template is a complete, installable distribution (``kvbm-NAME``): its own
``pyproject.toml`` declaring the entry point in the group ``kvbm.plugins`` and an
optional extra of its own, a package ``kvbm_NAME`` whose ``plugin.py`` registers the
tier type with ``@kvbm.hookimpl``, a config model subclassing ``kvbm.TierConfig``, a
tier that keeps blocks in a dict with kvbm's slot semantics, and a test that runs a
chain through it. ``pip install -e .`` in that folder, and ``kvbm plugins`` lists it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from .errors import ConfigError
from .plugins import _dist_version

#: What NAME may be: it becomes a tier type, a package name and a distribution name.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
NAME_RULE = ("1-40 lowercase letters and digits, words joined by single '_', starting "
             "with a letter (e.g. mytier, my_tier)")


def names_for(name: str) -> dict[str, str]:
    """The names the template uses for tier type ``name``; ConfigError when it cannot be one."""
    if len(name) > 40 or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"plugin name {name!r}: must be {NAME_RULE}")
    camel = "".join(part.capitalize() for part in name.split("_") if part)
    version = _dist_version("kvbm")
    return {
        "__NAME__": name,
        "__DIST__": "kvbm-" + name.replace("_", "-"),
        "__PKG__": f"kvbm_{name}",
        "__CLASS__": f"{camel}Tier",
        "__ENV__": f"KVBM_{name.upper()}_GB",
        "__KVBM_REQ__": "kvbm" if "+" in version else f"kvbm>={version}",
    }


def new_plugin(name: str, directory: Path | None = None) -> list[Path]:
    """Write the template for tier type ``name`` into ``directory`` (default
    ``./kvbm-NAME``); the files written. Refuses a folder that is not empty and a
    package name that is importable already (it would shadow or be shadowed)."""
    names = names_for(name)
    pkg = names["__PKG__"]
    if importlib.util.find_spec(pkg) is not None:
        raise ConfigError(f"plugin name {name!r}: a package {pkg} is installed already; "
                          "choose another name")
    root = Path(directory) if directory is not None else Path(names["__DIST__"])
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"--dir {str(root)!r}: exists and is not an empty folder; "
                          "name a new one")
    written: list[Path] = []
    for rel, text in TEMPLATE.items():
        for key, value in names.items():
            rel = rel.replace(key, value)
            text = text.replace(key, value)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "__DIST__"
version = "0.1.0"
description = "A kvbm tier plugin: tier type '__NAME__'"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["__KVBM_REQ__"]

[project.optional-dependencies]
# What the tier needs beyond kvbm (a client library, a codec). Name the modules it
# imports in REQUIRES (plugin.py): while one is missing, `kvbm plugins` lists the tier
# as unavailable with "pip install '__DIST__[client]'".
client = []
test = ["pytest>=8"]

# kvbm finds the plugin here: NAME = the module holding the @kvbm.hookimpl functions.
[project.entry-points."kvbm.plugins"]
__NAME__ = "__PKG__.plugin"

[tool.setuptools.packages.find]
include = ["__PKG__*"]

[tool.setuptools.package-data]
"*" = ["py.typed"]
'''

_README = '''\
# __DIST__

A kvbm tier plugin: tier type `__NAME__`, blocks kept in a dict in this process's
memory. Start from here and replace the dict with your storage.

```bash
pip install -e '.[test]'
kvbm plugins                 # lists tier "__NAME__" of distribution __DIST__
pytest tests
```

In kvbm's YAML:

```yaml
tiers:
  - {type: host, capacity: 4GiB}
  - {type: __NAME__, capacity: 16GiB, checksum: true}
```

or `__ENV__=16` in the environment (decimal gigabytes) adds one to the chain.
'''

_INIT = '''\
"""kvbm tier plugin: tier type ``__NAME__``."""
'''

_PLUGIN = '''\
"""Registers the ``__NAME__`` tier type with kvbm.

kvbm imports this module through the entry point in pyproject.toml (group
``kvbm.plugins``) and calls each function decorated with ``@kvbm.hookimpl`` whose name
is one of kvbm's hooks (``kvbm.hookspecs``), passing its arguments by name
(``registry``). A function without the decorator registers nothing; a decorated one
whose name is no kvbm hook stops kvbm at start-up. Import only kvbm and the standard
library here: the tier's own module is imported when a chain uses it.
"""

from __future__ import annotations

import kvbm
from kvbm.config import EnvAlias, decimal_gigabytes
from kvbm.plugins import TierRegistry

from .config import __CLASS__Config

#: Top-level modules the tier imports beyond kvbm; this distribution's ``client`` extra
#: installs them. While one is missing, ``kvbm plugins`` lists the tier as unavailable
#: and a chain naming it fails with "pip install '__DIST__[client]'".
REQUIRES: tuple[str, ...] = ()


@kvbm.hookimpl
def kvbm_register_tiers(registry: TierRegistry) -> None:
    """Add the ``__NAME__`` tier type."""
    registry.add(
        "__NAME__",
        factory="__PKG__.tier:__CLASS__",  # "module:Class", imported when a chain uses it
        config_model=__CLASS__Config,
        extra="client",
        requires=REQUIRES,
        description="blocks in a dict in this process's memory (template)",
        # Place in a chain, fastest first: gpu 0, host 1, disk 2, s3 3, remote 4.
        order=5,
        # An environment variable that sets a key (and adds the tier to a chain).
        env={"__ENV__": EnvAlias("capacity", decimal_gigabytes)},
    )
'''

_CONFIG = '''\
"""Config keys of the ``__NAME__`` tier."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvbm import TierConfig


class __CLASS__Config(TierConfig):
    """``{type: __NAME__, capacity: 16GiB}``.

    ``kvbm.TierConfig`` gives every tier ``name``, ``capacity``/``num_blocks``,
    ``policy``, ``admission`` and their options, and refuses unknown keys; add yours
    with a default and a description.
    """

    type: Literal["__NAME__"] = "__NAME__"
    checksum: bool = Field(True, description="check each block's CRC-32 on read; "
                                             "a mismatch is a miss")
'''

_TIER = '''\
"""The ``__NAME__`` tier: whole blocks in a dict, addressed by slot.

The contract (``kvbm.Tier``): kvbm's planner owns the metadata and hands the tier a
slot in ``[0, num_slots)`` for each block. ``write`` stores block ``keys[i]`` in
``slots[i]``, replacing whatever that slot held; ``read`` fills ``dst[i]`` from
``slots[i]`` and answers False when the slot does not hold an intact ``keys[i]`` (a bad
block is a miss, never data); ``discard`` may arrive after a later write into the same
slot, so it forgets a slot only if it still holds that key. ``keys`` are 16-byte
``bytes``; ``src``/``dst`` are 1-D ``uint8`` numpy arrays of ``block_bytes`` each,
valid only during the call (copy out of ``src``, write into ``dst`` in place). The
methods run on several threads at once, on disjoint slots: guard shared state.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from kvbm import SequenceHash, Tier, TierContext

from .config import __CLASS__Config


class __CLASS__(Tier):
    """Blocks in a dict: slot -> (key, bytes, crc32)."""

    #: Display name of the tier type.
    kind: ClassVar[str] = "__NAME__"
    #: Where blocks live, one of kvbm.tier.MEDIA ("GPU", "CPU", "DISK", "OBJECT",
    #: "REMOTE", "STORAGE"): the medium of its KV events and its metrics' label.
    medium: ClassVar[str] = "CPU"
    #: True if other instances write blocks into this storage (then override probe()).
    shared: ClassVar[bool] = False
    #: The admission filter used when the config names none (None admits every block).
    default_admission: ClassVar[str | None] = None

    def __init__(self, config: __CLASS__Config, ctx: TierContext) -> None:
        super().__init__(config, ctx)  # sets name, num_slots, block_bytes
        self.checksum = config.checksum
        self._lock = threading.Lock()
        self._blocks: dict[int, tuple[bytes, bytes, int]] = {}

    def write(self, slots: Sequence[int], keys: Sequence[SequenceHash],
              src: Sequence[np.ndarray]) -> list[bool]:
        ok: list[bool] = []
        for slot, key, buf in zip(slots, keys, src):
            data = buf.tobytes()  # a copy: src is reused once write returns
            if len(data) != self.block_bytes or not 0 <= slot < self.num_slots:
                ok.append(False)
                continue
            with self._lock:
                self._blocks[slot] = (bytes(key), data, zlib.crc32(data))
            ok.append(True)
        return ok

    def read(self, slots: Sequence[int], keys: Sequence[SequenceHash],
             dst: Sequence[np.ndarray]) -> list[bool]:
        ok: list[bool] = []
        for slot, key, out in zip(slots, keys, dst):
            with self._lock:
                held = self._blocks.get(slot)
            if held is None or held[0] != key or len(held[1]) != out.nbytes:
                ok.append(False)  # not this block: a miss
                continue
            if self.checksum and zlib.crc32(held[1]) != held[2]:
                ok.append(False)  # damaged: a miss, never data
                continue
            out[:] = np.frombuffer(held[1], dtype=np.uint8)
            ok.append(True)
        return ok

    def discard(self, slots: Sequence[int], keys: Sequence[SequenceHash]) -> None:
        with self._lock:
            for slot, key in zip(slots, keys):
                held = self._blocks.get(slot)
                if held is not None and held[0] == key:
                    del self._blocks[slot]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"blocks": len(self._blocks)}

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
'''

_TEST = '''\
"""The ``__NAME__`` tier through a real kvbm chain: blocks saved come back byte for byte."""

from __future__ import annotations

import numpy as np

from kvbm import ContiguousBlocks, KvBlockManager, SequenceHash
from kvbm.plugins import build_plugins

MODEL = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "float32"}
PAGE = 4


def chain(**keys: object) -> KvBlockManager:
    return KvBlockManager.from_config(
        {"model": MODEL, "page_size": PAGE, "tiers": [{"type": "__NAME__", "num_blocks": 16, **keys}]})


def save(mgr: KvBlockManager, n: int) -> tuple[list[SequenceHash], np.ndarray]:
    rng = np.random.default_rng(0)
    hashes = mgr.hash_tokens(rng.integers(0, 1000, n * PAGE))
    data = rng.integers(0, 256, (n, mgr.block_bytes), dtype=np.uint8)
    assert mgr.offload(hashes, ContiguousBlocks(data, mgr.layout)).stored == n
    mgr.flush()
    return hashes, data


def load(mgr: KvBlockManager, hashes: list[SequenceHash]) -> tuple[int, np.ndarray]:
    out = np.zeros((len(hashes), mgr.block_bytes), np.uint8)
    with mgr.match_prefix(hashes) as m:
        loaded = mgr.onboard(m, ContiguousBlocks(out, mgr.layout)).loaded
    return loaded, out


def test_the_plugin_registers_its_tier_type_through_the_entry_point() -> None:
    entry = build_plugins().tiers.get("__NAME__")
    assert entry.plugin.distribution == "__DIST__" and entry.available


def test_saved_blocks_load_back_byte_exact() -> None:
    with chain() as mgr:
        hashes, data = save(mgr, 6)
        loaded, out = load(mgr, hashes)
        assert loaded == 6 and np.array_equal(out, data)


def test_a_damaged_block_is_a_miss_not_data() -> None:
    with chain() as mgr:
        hashes, data = save(mgr, 3)
        blocks = mgr.chain[0].tier._blocks
        slot = next(s for s, (key, _, _) in blocks.items() if key == hashes[1])
        key, raw, crc = blocks[slot]
        blocks[slot] = (key, bytes([raw[0] ^ 1]) + raw[1:], crc)  # one bit flipped
        loaded, out = load(mgr, hashes)
        # The prefix ends before the damaged block; its bytes never reach the engine.
        assert loaded == 1 and np.array_equal(out[0], data[0])
        assert not np.array_equal(out[1], data[1])
'''

#: The template: path (with the placeholders) -> text.
TEMPLATE: dict[str, str] = {
    "pyproject.toml": _PYPROJECT,
    "README.md": _README,
    "__PKG__/__init__.py": _INIT,
    "__PKG__/py.typed": "",
    "__PKG__/plugin.py": _PLUGIN,
    "__PKG__/config.py": _CONFIG,
    "__PKG__/tier.py": _TIER,
    "tests/test___NAME__.py": _TEST,
}
