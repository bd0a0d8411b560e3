"""Cached KV is user data: 0600 files in a 0700 directory, and no following a symlink
into a place another user owns."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kvbm import BlockLayout, ConfigError, ModelSpec, Namespace
from kvbm.tier import TierContext
from kvbm_tiers_disk.config import DiskTierConfig
from kvbm_tiers_disk.tier import DiskTier

from conftest import PAGE, SMALL_MODEL

NOBODY = 65534


def make_tier(path: Path | str) -> DiskTier:
    layout = BlockLayout(ModelSpec(**SMALL_MODEL), PAGE)
    ns = Namespace(SMALL_MODEL["name"], layout.digest)
    cfg = DiskTierConfig(type="disk", name="disk", path=str(path), num_blocks=4)
    return DiskTier(cfg, TierContext("disk", ns, layout, 4))


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_files_are_0600_in_a_0700_directory_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        t = make_tier(tmp_path)
    finally:
        os.umask(old)
    try:
        d = t.directories[0]
        assert mode(d) == 0o700
        assert {p.name: mode(p) for p in d.iterdir()} == {"lock": 0o600, "blocks-0.kvc": 0o600}
    finally:
        t.close()


def test_an_existing_directory_open_to_others_is_tightened(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    d = t.directories[0]
    t.close()
    os.chmod(d, 0o755)
    os.chmod(d / "blocks-0.kvc", 0o644)
    t = make_tier(tmp_path)
    try:
        assert (mode(d), mode(d / "blocks-0.kvc")) == (0o700, 0o600)
    finally:
        t.close()


@pytest.fixture
def foreign_dir(tmp_path: Path) -> Path:
    """A directory owned by another user (nobody); needs root to chown."""
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    d = tmp_path / "theirs"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    os.chown(d, NOBODY, NOBODY)
    return d


def test_directory_symlinked_to_another_users_place_is_refused(tmp_path: Path, foreign_dir: Path) -> None:
    link = tmp_path / "cache"
    link.symlink_to(foreign_dir)
    with pytest.raises(ConfigError, match=f"symlink to .*owned by uid {NOBODY}"):
        make_tier(link)
    assert not list(foreign_dir.iterdir()), "nothing was created there"


def test_namespace_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    t = make_tier(tmp_path)
    d = t.directories[0]
    t.close()
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}"):
        make_tier(tmp_path)


def test_directory_symlinked_to_own_place_is_accepted(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    t = make_tier(link)
    try:
        assert list(real.glob("kvbm-*/blocks-0.kvc"))
    finally:
        t.close()
