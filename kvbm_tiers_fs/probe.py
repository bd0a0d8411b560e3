"""What a shared directory allows: O_DIRECT or buffered I/O, which filesystem, free space.

The fs tier runs ``detect_o_direct`` at start (``o_direct: auto``) and reports the
answer in ``stats()``; ``probe_directory(path)`` is the same check for a command to
print before any tier starts (``kvbm config check --probe``)::

    >>> from kvbm_tiers_fs.probe import probe_directory
    >>> print("\\n".join(probe_directory("/mnt/shared/kvbm").lines()))

Only the standard library: the check costs one 4 KiB file, written and read back,
then removed. Its name is a temporary's, so a crash in between leaves nothing the
janitor would not remove.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from ._paths import HOST_TAG, NOFOLLOW, TEMP_SUFFIX

__all__ = ["DirectoryProbe", "detect_o_direct", "filesystem_of", "probe_directory"]

O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_PAGE = 4096


@dataclass(frozen=True)
class DirectoryProbe:
    """What ``probe_directory`` found for one directory."""

    path: str
    #: The filesystem type the directory is on (``nfs4``, ``lustre``, ``ext4``, ``tmpfs``),
    #: "" where /proc/self/mountinfo is not readable.
    filesystem: str
    mount_point: str
    #: Whether a file there accepts O_DIRECT writes and reads of aligned pages.
    o_direct: bool
    #: Why: "accepted", or the call that refused it and its error.
    o_direct_reason: str
    free_bytes: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON output)."""
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable lines, one fact each."""
        io = "O_DIRECT" if self.o_direct else "buffered"
        fs = self.filesystem or "unknown filesystem"
        return [
            f"{self.path}: {fs} mounted at {self.mount_point or '?'}",
            f"  reads and writes: {io} ({self.o_direct_reason})",
            f"  free: {self.free_bytes / 2**30:.1f} GiB",
        ]


def _aligned_page() -> mmap.mmap:
    # Anonymous mmap memory is page-aligned, as O_DIRECT wants its buffers.
    return mmap.mmap(-1, _PAGE)


def detect_o_direct(dir_fd: int) -> tuple[bool, str]:
    """Write and read back one aligned page with O_DIRECT in the directory ``dir_fd``.

    Returns (accepted, reason). tmpfs refuses the open (EINVAL); some FUSE and
    network filesystems accept the open and refuse the I/O, so both are tried.
    """
    if not O_DIRECT:
        return False, "O_DIRECT does not exist on this platform"
    name = f".probe.{HOST_TAG}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW
    try:
        fd = os.open(name, flags | O_DIRECT, 0o600, dir_fd=dir_fd)
    except OSError as e:
        return False, f"open with O_DIRECT failed: {errno.errorcode.get(e.errno or 0, e.errno)} ({e.strerror})"
    try:
        out, back = _aligned_page(), _aligned_page()
        out.write(secrets.token_bytes(_PAGE))
        try:
            if os.pwritev(fd, [out], 0) != _PAGE:
                return False, "O_DIRECT write of one page was short"
            if os.preadv(fd, [back], 0) != _PAGE:
                return False, "O_DIRECT read of one page was short"
        except OSError as e:
            return False, f"O_DIRECT I/O failed: {errno.errorcode.get(e.errno or 0, e.errno)} ({e.strerror})"
        if out[:] != back[:]:
            return False, "O_DIRECT read back other bytes than were written"
        return True, "accepted"
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_of(path: str) -> tuple[str, str]:
    """(filesystem type, mount point) of ``path``; ("", "") when unknown."""
    real = os.path.realpath(path)
    best = ("", "")
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mp = _unescape(fields[4])
                inside = real == mp or real.startswith(mp.rstrip("/") + "/")
                # The last of equally long matches is the one mounted on top.
                if inside and len(mp) >= len(best[1]):
                    best = (right.split()[0], mp)
    except OSError:
        pass
    return best


def probe_directory(path: str) -> DirectoryProbe:
    """Check ``path`` (an existing directory) as the fs tier would at start.

    Raises ``OSError`` naming the directory when it cannot be opened or written.
    """
    try:
        # The configured path may be a symlink (a mount point's alias); the tier checks
        # its owner at start. Only the files below are opened without following links.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"fs tier probe: cannot open directory {path!r} ({e.strerror}); "
                      "create it or give another path") from None
    try:
        direct, why = detect_o_direct(fd)
        sv = os.fstatvfs(fd)
    finally:
        os.close(fd)
    fstype, mp = filesystem_of(path)
    return DirectoryProbe(path, fstype, mp, direct, why, sv.f_bavail * sv.f_frsize)
