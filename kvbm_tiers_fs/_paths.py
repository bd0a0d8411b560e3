"""Where the fs tier's files live, and the checks that keep other users out of them.

Layout under the configured ``path``::

    path/                                   anyone's (a mount point); checked as the disk tier does
      kvbm-<namespace hex>/                 0700, this user's, never a symlink
        .janitor.lock                       who runs the janitor pass now (advisory)
        ab/cd/<key hex>.kvb                 one block: header page + padded data, 0600
        ab/cd/.<key hex>.<host>.<pid>.<nonce>.tmp   a write in progress

``ab`` and ``cd`` are the first bytes of the key (``fanout`` levels of them), so a
million blocks spread over 65536 directories. A temporary sits in the directory of
the file it becomes, so the rename that publishes it never crosses a filesystem. Its
name says which process on which host (boot and pid namespace included) writes it,
so a later start on the same host can tell a dead writer's temporary at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import xxhash

from kvbm.errors import ConfigError

#: Suffix of a published block file and of a write in progress.
BLOCK_SUFFIX = ".kvb"
TEMP_SUFFIX = ".tmp"
JANITOR_LOCK = ".janitor.lock"
NS_PREFIX = "kvbm-"

#: Flags of every file and directory open: never follow a symlink, never leak an fd.
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW


def _host_tag() -> str:
    """Who "this host" is for temporaries: hostname, boot and pid namespace together,
    so two containers with one hostname (host networking) never take each other's
    live writers for dead ones."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return xxhash.xxh3_64_hexdigest("|".join(parts).encode())


HOST_TAG = _host_tag()


def block_name(key: bytes, fanout: int) -> tuple[str, str]:
    """(directory, file) of block ``key``, relative to the namespace directory."""
    h = key.hex()
    d = "/".join(h[2 * i : 2 * i + 2] for i in range(fanout))
    return d, f"{h}{BLOCK_SUFFIX}"


def temp_name(key: bytes) -> str:
    """A fresh temporary's file name for ``key`` (unique across hosts and processes)."""
    return f".{key.hex()}.{HOST_TAG}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


@dataclass(frozen=True)
class TempOwner:
    """The writer a temporary's name names."""

    host: str
    pid: int

    def is_dead_here(self) -> bool:
        """True when the writer ran on this host and its process is gone.

        A reused pid reads as alive: that temporary then waits for ``temp_max_age_s``.
        """
        if self.host != HOST_TAG or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def parse_temp(name: str) -> TempOwner | None:
    """The writer of temporary ``name``; None when the name is not one of ours."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    parts = name[1 : -len(TEMP_SUFFIX)].split(".")
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return TempOwner(parts[1], int(parts[2]))


def _refuse_foreign(tier: str, path: Path, st: os.stat_result, what: str) -> None:
    me = os.geteuid()
    if st.st_uid != me:
        raise ConfigError(
            f"fs tier {tier!r}: key 'path': {str(path)!r} {what} owned by uid {st.st_uid}, "
            f"not by this process (uid {me}); another user could read or swap the cached KV. "
            "Give a directory this user owns (every instance sharing it runs as one user)"
        )


def prepare_root(tier: str, base: str) -> Path:
    """Create (or check) the shared directory ``base``.

    ``base`` itself may belong to anyone (a mount point, /tmp), but a symlink in its
    place must lead to a directory this user owns, as for the disk tier.
    """
    bp = Path(base)
    try:
        lst = os.lstat(bp)
    except FileNotFoundError:
        try:
            os.makedirs(bp, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"fs tier {tier!r}: key 'path': cannot create {base!r} ({e.strerror}); "
                "create it (or mount the shared filesystem there) or give another directory"
            ) from None
        lst = os.lstat(bp)
    if stat.S_ISLNK(lst.st_mode):
        try:
            target = os.stat(bp)
        except OSError as e:
            raise ConfigError(
                f"fs tier {tier!r}: key 'path': {base!r} is a symlink that cannot be "
                f"followed ({e.strerror}); give a real directory"
            ) from None
        _refuse_foreign(tier, bp, target, f"is a symlink to {os.path.realpath(bp)!r}, which is")
        lst = target
    if not stat.S_ISDIR(lst.st_mode):
        raise ConfigError(f"fs tier {tier!r}: key 'path': {base!r} is not a directory")
    return bp


def open_namespace_dir(tier: str, root: Path, namespace_hex: str) -> tuple[Path, int]:
    """Create (or check) ``root/kvbm-<namespace>`` and open it; returns (path, fd).

    The directory must be a real directory (never a symlink) that this user owns; its
    mode is forced to 0700. Every later file operation goes through the returned
    descriptor, so swapping the directory for a symlink afterwards changes nothing.
    """
    sub = root / f"{NS_PREFIX}{namespace_hex}"
    try:
        os.mkdir(sub, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise ConfigError(
            f"fs tier {tier!r}: key 'path': cannot create {str(sub)!r} ({e.strerror}); "
            "give a directory this user can write"
        ) from None
    try:
        fd = os.open(sub, DIR_FLAGS)
    except OSError as e:
        if stat.S_ISLNK(os.lstat(sub).st_mode):
            raise ConfigError(
                f"fs tier {tier!r}: {str(sub)!r} is a symlink; the fs tier follows none. "
                "Remove it (the tier recreates the directory)"
            ) from None
        raise ConfigError(
            f"fs tier {tier!r}: cannot open {str(sub)!r} ({e.strerror}); remove it if it is "
            "not a directory"
        ) from None
    try:
        st = os.fstat(fd)
        _refuse_foreign(tier, sub, st, "is")
        if stat.S_IMODE(st.st_mode) != 0o700:
            # The umask or an older run may have left it open to others; KV is user data.
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return sub, fd


def check_subdir(dir_fd: int, rel: str, create: bool) -> bool:
    """Make sure every level of fan-out directory ``rel`` is a real 0700 directory this
    user owns (created when ``create``). False when one is missing (and not created);
    OSError(ELOOP) naming the level that is a symlink or another user's."""
    if not rel:
        return True
    me = os.geteuid()
    parts = rel.split("/")
    for i in range(len(parts)):
        sub = "/".join(parts[: i + 1])
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(sub, 0o700, dir_fd=dir_fd)
        try:
            st = os.stat(sub, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != me:
            raise OSError(errno.ELOOP, f"fan-out directory {sub!r} is not a directory of "
                          f"uid {me} (a symlink or another user's); refusing it")
        if stat.S_IMODE(st.st_mode) & 0o077:
            # Checked above to be a directory, not a symlink (fchmodat cannot refuse one).
            os.chmod(sub, 0o700, dir_fd=dir_fd)
    return True
