"""The fs tier's files stay this user's: modes, owners, and no symlink ever followed."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm import Namespace
from kvbm.errors import ConfigError
from kvbm.layout import BlockLayout, ModelSpec
from kvbm.tier import TierContext
from kvbm_tiers_fs.config import FsTierConfig
from kvbm_tiers_fs.tier import FsTier

LAYOUT = BlockLayout(ModelSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16",
                               name="tiny"), 16)
BB = LAYOUT.bytes_per_block
OTHER_UID = 54321
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def make_tier(path: Path, **over: Any) -> FsTier:
    cfg = FsTierConfig.model_validate({"type": "fs", "name": "fs", "path": str(path),
                                       "capacity": "1MiB", "janitor": False, **over})
    ns = Namespace(model_id="sec", layout_digest=LAYOUT.digest)
    return FsTier(cfg, TierContext("fs", ns, LAYOUT, cfg.resolve_num_blocks(BB)))


def ns_dir(root: Path) -> Path:
    return root / f"kvbm-{Namespace(model_id='sec', layout_digest=LAYOUT.digest).hex}"


def block(seed: int) -> tuple[list[Any], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [bytes(rng.integers(0, 256, 16, dtype=np.uint8))], [rng.integers(0, 256, BB, dtype=np.uint8)]


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_files_are_0600_and_directories_0700_under_an_open_umask(tmp_path: Path, open_umask: None) -> None:
    t = make_tier(tmp_path / "root")
    try:
        k, d = block(1)
        assert t.write([0], k, d) == [True]
        t.janitor()
        for p in [t.directory, *t.directory.rglob("*")]:
            mode = stat.S_IMODE(p.lstat().st_mode)
            assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
    finally:
        t.close()


def test_namespace_directory_open_to_others_is_closed_at_start(tmp_path: Path) -> None:
    d = ns_dir(tmp_path)
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    make_tier(tmp_path).close()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_namespace_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "root").mkdir()
    ns_dir(tmp_path / "root").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="is a symlink; the fs tier follows none"):
        make_tier(tmp_path / "root")


@needs_root
def test_namespace_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    d = ns_dir(tmp_path)
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError, match=rf"owned by uid {OTHER_UID}.*Give a directory this user owns"):
        make_tier(tmp_path)


@needs_root
def test_root_symlink_to_another_users_directory_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, OTHER_UID, OTHER_UID)
    (tmp_path / "link").symlink_to(theirs)
    with pytest.raises(ConfigError, match="is a symlink to .* which is owned by uid"):
        make_tier(tmp_path / "link")


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="key 'path'.* is not a directory"):
        make_tier(tmp_path / "f")


def test_block_file_that_is_a_symlink_is_never_followed(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    try:
        k, d = block(2)
        t.write([0], k, d)
        real = t.directory / t.path_of(k[0])
        stash = tmp_path / "stash.kvb"
        real.rename(stash)  # an intact block, reachable only through the link
        real.symlink_to(stash)
        assert t.read([0], k, [np.zeros(BB, np.uint8)]) == [False]
        assert t.probe(k) == [False]
        assert t.stats()["refused_files"] == 1
    finally:
        t.close()


def test_writer_never_writes_through_a_symlinked_fanout_directory(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    try:
        k, d = block(3)
        h = k[0].hex()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        (t.directory / h[:2]).symlink_to(elsewhere)
        assert t.write([0], k, d) == [False]
        assert list(elsewhere.rglob("*")) == []
        assert t.read([0], k, [np.zeros(BB, np.uint8)]) == [False]
    finally:
        t.close()


@needs_root
def test_block_file_of_another_user_is_a_miss(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    try:
        k, d = block(4)
        t.write([0], k, d)
        os.chown(t.directory / t.path_of(k[0]), OTHER_UID, OTHER_UID)
        assert t.read([0], k, [np.zeros(BB, np.uint8)]) == [False]
        assert t.probe(k) == [False]
        assert t.stats()["refused_files"] == 1
    finally:
        t.close()


@needs_root
def test_fanout_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    try:
        k, d = block(5)
        h = k[0].hex()
        sub = t.directory / h[:2]
        sub.mkdir(mode=0o700)
        os.chown(sub, OTHER_UID, OTHER_UID)
        assert t.write([0], k, d) == [False]
        assert t.read([0], k, [np.zeros(BB, np.uint8)]) == [False]
    finally:
        t.close()


def test_janitor_never_walks_into_a_symlinked_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / f"{'ee' * 16}.kvb"
    victim.write_bytes(b"x" * 100_000)
    t = make_tier(tmp_path / "root", capacity=8192, janitor_low_water=0.1)
    try:
        (t.directory / "ee").symlink_to(outside)
        rep = t.janitor()
        assert victim.exists() and rep.files == 0
    finally:
        t.close()
