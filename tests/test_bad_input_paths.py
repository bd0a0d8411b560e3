"""Paths under shared directories: nothing planted there is followed, chmodded or written.

An attacker who can write the shared directory (``/tmp``, a rendezvous directory)
plants names before kvbm starts: a symlink where kvbm's own directory goes, a
symlink on the way to it, a hard link where its lock file goes, a symlink where a
rendezvous record's temporary file goes, an ``instance_id`` that climbs out. Each
test plants one and checks both the refusal and that the victim's files are as they
were. Ownership cases chown to ``nobody`` and need root (skipped otherwise).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kvbm import BlockLayout, ConfigError, ModelSpec, Namespace
from kvbm.tier import TierContext
from kvbm_tiers_disk.config import DiskTierConfig
from kvbm_tiers_disk.tier import DiskTier
from kvbm_tiers_remote.rendezvous import DirectoryRendezvous

from conftest import PAGE, SMALL_MODEL

NOBODY = 65534
LAYOUT = BlockLayout(ModelSpec(**SMALL_MODEL), PAGE)
NS = Namespace(SMALL_MODEL["name"], LAYOUT.digest)


def disk_tier(path: Path | str) -> DiskTier:
    cfg = DiskTierConfig(type="disk", name="disk", path=str(path), num_blocks=4)
    return DiskTier(cfg, TierContext("disk", NS, LAYOUT, 4))


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A directory of the victim's (this user's) with a file named like kvbm's lock."""
    v = tmp_path / "victim"
    v.mkdir(mode=0o755)
    os.chmod(v, 0o755)
    (v / "lock").write_text("precious\n")
    return v


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("planting a file owned by another user needs root")


def test_a_symlink_planted_as_the_namespace_directory_is_refused(
    tmp_path: Path, victim: Path,
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / f"kvbm-{NS.hex}").symlink_to(victim)
    with pytest.raises(ConfigError, match="is a symlink .*kvbm never follows one there"):
        disk_tier(shared)
    assert mode(victim) == 0o755 and (victim / "lock").read_text() == "precious\n"
    assert sorted(p.name for p in victim.iterdir()) == ["lock"]


def test_a_symlink_another_user_planted_on_the_way_is_not_followed(
    tmp_path: Path, victim: Path,
) -> None:
    needs_root()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    os.chmod(shared, 0o1777)
    link = shared / "cache"
    link.symlink_to(victim)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"'{link}' is a symlink owned by uid {NOBODY}"):
        disk_tier(link / "kvbm")
    assert sorted(p.name for p in victim.iterdir()) == ["lock"]


def test_missing_directories_are_made_one_at_a_time_private_to_this_user(tmp_path: Path) -> None:
    base = tmp_path / "a" / "b" / "c"
    old = os.umask(0)
    try:
        t = disk_tier(base)
    finally:
        os.umask(old)
    try:
        assert [mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3
        assert mode(t.directories[0]) == 0o700
    finally:
        t.close()


def test_a_lock_file_hard_linked_to_another_file_is_refused(tmp_path: Path, victim: Path) -> None:
    t = disk_tier(tmp_path / "cache")
    d = t.directories[0]
    t.close()
    (d / "lock").unlink()
    os.link(victim / "lock", d / "lock")
    with pytest.raises(ConfigError, match="is not a plain file of this user's"):
        disk_tier(tmp_path / "cache")
    assert (victim / "lock").read_text() == "precious\n"


def test_a_base_directory_anyone_may_rename_in_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "open"
    base.mkdir()
    os.chmod(base, 0o777)
    with pytest.raises(ConfigError, match="lacks the sticky bit"):
        disk_tier(base)
    assert list(base.iterdir()) == []


def test_a_sticky_directory_open_to_all_is_accepted(tmp_path: Path) -> None:
    base = tmp_path / "tmp-like"
    base.mkdir()
    os.chmod(base, 0o1777)
    disk_tier(base).close()


# -- the remote tier's rendezvous directory -------------------------------------------------
def test_an_instance_id_that_climbs_out_of_the_rendezvous_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "peers"
    with pytest.raises(ConfigError, match="key 'instance_id': value '../../x'"):
        DirectoryRendezvous("remote", str(root), NS.hex, "../../x")
    assert not (tmp_path / "x.kvbm-peer").exists()


def test_a_symlink_planted_as_the_rendezvous_namespace_directory_is_refused(
    tmp_path: Path, victim: Path,
) -> None:
    root = tmp_path / "peers"
    root.mkdir()
    (root / NS.hex).symlink_to(victim)
    with pytest.raises(ConfigError, match="key 'rendezvous_dir': .* is a symlink"):
        DirectoryRendezvous("remote", str(root), NS.hex, "me")
    assert sorted(p.name for p in victim.iterdir()) == ["lock"]


def test_a_record_is_never_written_through_a_planted_temporary_name(
    tmp_path: Path, victim: Path,
) -> None:
    rdv = DirectoryRendezvous("remote", str(tmp_path / "peers"), NS.hex, "me")
    tmp = rdv.path.with_name(f".{rdv.path.name}.{os.getpid()}.tmp")
    tmp.symlink_to(victim / "lock")
    assert rdv.publish(b"record")
    assert rdv.path.read_bytes() == b"record" and not rdv.path.is_symlink()
    assert (victim / "lock").read_text() == "precious\n"
