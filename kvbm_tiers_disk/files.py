"""Directories and slot files of the disk tier: safety checks, locking, space reservation.

Everything here runs at start-up (or when a file vanished underneath a running tier);
the data path lives in ``native_loop.py`` and ``pyloop.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvbm.errors import ConfigError
from kvbm.layout import aligned_empty
from kvbm.safepaths import UnsafePath, open_directory, private_subdir
from kvbm.sizes import format_size

from .format import SUPERBLOCK_BYTES, Geometry, Superblock

log = logging.getLogger("kvbm.disk")

O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_ZERO_CHUNK = 8 << 20
_FALLOC_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_NO_DIRECT_FIX = "set disable_o_direct: true (DYN_KVBM_DISK_DISABLE_O_DIRECT=true)"


def _libc_fallocate() -> object | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_LIBC_FALLOCATE = _libc_fallocate()


def _fallocate(fd: int, offset: int, length: int) -> None:
    """Reserve ``[offset, offset+length)`` with fallocate(2).

    The raw syscall, not ``os.posix_fallocate``: glibc's posix_fallocate silently
    emulates an unsupported fallocate by writing a byte per block, which hides the
    case the zero-fill fallback exists for.
    """
    fn = _LIBC_FALLOCATE
    if fn is None:
        os.posix_fallocate(fd, offset, length)
        return
    if fn(fd, 0, offset, length) != 0:  # type: ignore[operator]
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def zero_fill(fd: int, offset: int, length: int) -> None:
    """Write zeros over ``[offset, offset+length)`` through one aligned buffer."""
    buf = aligned_empty(min(_ZERO_CHUNK, length))
    end = offset + length
    while offset < end:
        n = min(len(buf), end - offset)
        written = os.pwritev(fd, [buf[:n]], offset)
        if written <= 0:
            raise OSError(errno.EIO, f"zero-fill wrote {written} bytes at offset {offset}")
        offset += written


def _refuse_foreign(tier: str, path: Path, st: os.stat_result, what: str) -> None:
    me = os.geteuid()
    if st.st_uid != me:
        raise ConfigError(
            f"disk tier {tier!r}: key 'path': {str(path)!r} {what} owned by uid {st.st_uid}, "
            f"not by this process (uid {me}); another user could read or swap the cached KV. "
            "Give a directory you own"
        )


def prepare_directory(tier: str, base: str, namespace_hex: str) -> Path:
    """Create (or check) ``base/kvbm-<namespace>`` as a 0700 directory this user owns.

    The default ``base`` is under ``/tmp``, where any user can plant names. So missing
    components of ``base`` are made one at a time relative to their parent, following
    no symlink another user owns (``kvbm.safepaths``); a ``base`` that is a symlink to
    a place another user owns is refused; and ``kvbm-<namespace>`` itself is never a
    symlink: it is opened with ``O_NOFOLLOW`` and checked for owner and mode through
    its descriptor, so a planted link to one of the victim's directories is refused
    instead of chmodded and written into.
    """
    where = f"disk tier {tier!r}: key 'path'"
    bp = Path(base)
    try:
        lst: os.stat_result | None = os.lstat(bp)
    except OSError:
        lst = None  # missing, or a component is not a directory: open_directory says which
    if lst is not None and stat.S_ISLNK(lst.st_mode):
        try:
            target = os.stat(bp)
        except OSError as e:
            raise ConfigError(
                f"{where}: {base!r} is a symlink that cannot be followed ({e.strerror}); "
                "give a real directory"
            ) from None
        _refuse_foreign(tier, bp, target, f"is a symlink to {os.path.realpath(bp)!r}, which is")
    sub = bp / f"kvbm-{namespace_hex}"
    try:
        bfd = open_directory(base)
        try:
            if lst is not None and stat.S_ISLNK(lst.st_mode):
                # The link may have been swapped since it was checked: look again, through
                # the descriptor now in use.
                _refuse_foreign(tier, bp, os.fstat(bfd),
                                f"is a symlink to {os.path.realpath(bp)!r}, which is")
            os.close(private_subdir(bfd, sub.name, str(sub)))
        finally:
            os.close(bfd)
    except UnsafePath as e:
        raise ConfigError(f"{where}: {e}") from None
    except OSError as e:
        raise ConfigError(
            f"{where}: cannot create or open {str(sub)!r} ({e.strerror}); create {base!r} "
            "yourself or give a writable directory"
        ) from None
    return sub


def lock_directory(tier: str, d: Path) -> int:
    """Hold an exclusive flock on ``d/lock`` so that two processes never share slot files.

    The lock file is opened through the directory's descriptor without following a
    symlink, and must be a regular file with one link before it is truncated: a hard
    link planted there would make kvbm overwrite another file.
    """
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600,
                     dir_fd=dfd)
    except OSError as e:
        raise ConfigError(
            f"disk tier {tier!r}: cannot open {str(d / 'lock')!r} ({e.strerror}); remove it"
        ) from None
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
        os.close(fd)
        raise ConfigError(
            f"disk tier {tier!r}: {str(d / 'lock')!r} is not a plain file of this user's "
            f"(links {st.st_nlink}, uid {st.st_uid}); remove it"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise ConfigError(
            f"disk tier {tier!r}: {str(d)!r} is in use by another kvbm tier (pid {holder}); "
            "give each process (or each disk tier) its own path, or stop the other one"
        ) from None
    os.fchmod(fd, 0o600)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass
class StripeFile:
    """One open slot file: stripe ``index`` of ``num_stripes``, holding ``num_local`` slots."""

    index: int
    path: Path
    fd: int
    num_local: int
    size: int
    #: fds replaced after the file vanished; closed only at the end, so that a thread
    #: still using one can never hit a recycled descriptor number.
    retired: list[int] = field(default_factory=list)


@dataclass
class FileOptions:
    """The keys that decide how slot files are opened and reserved."""

    o_direct: bool
    allocator_type: str
    zerofill_fallback: bool


def check_free_space(
    tier: str, plans: list[tuple[Path, int, int]], num_slots: int, block_bytes: int
) -> None:
    """Refuse at start when the files would need more space than their filesystem has.

    ``plans`` holds (directory, file size, bytes the existing file already holds).
    """
    by_dev: dict[int, list[tuple[Path, int]]] = {}
    total = 0
    for d, size, have in plans:
        need = max(0, size - have)
        total += size
        by_dev.setdefault(os.stat(d).st_dev, []).append((d, need))
    for items in by_dev.values():
        need = sum(n for _, n in items)
        if need == 0:
            continue
        d = items[0][0]
        sv = os.statvfs(d)
        free = sv.f_bavail * sv.f_frsize
        if need > free:
            raise ConfigError(
                f"disk tier {tier!r}: capacity {format_size(total)} ({num_slots} blocks of "
                f"{format_size(block_bytes)} with their headers) needs {format_size(need)} "
                f"more on {str(d.parent)!r}, which has {format_size(free)} free; lower "
                "capacity or num_blocks (DYN_KVBM_DISK_CACHE_GB, "
                "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS) or free some space"
            )


def plan_file(path: Path) -> int:
    """Bytes the existing file at ``path`` already holds on disk (0 when absent)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    return int(st.st_blocks) * 512 if stat.S_ISREG(st.st_mode) else 0


def _set_direct(tier: str, fd: int, path: Path) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | O_DIRECT)
    except OSError as e:
        raise ConfigError(
            f"disk tier {tier!r}: {str(path)!r}: O_DIRECT is not supported here "
            f"({e.strerror}); {_NO_DIRECT_FIX}, or give a directory on another filesystem"
        ) from None


def _reserve(tier: str, fd: int, path: Path, start: int, end: int, zerofill: bool) -> str:
    """Reserve the file's blocks; returns how ("fallocate", "zerofill" or "none")."""
    if end <= 0:
        return "none"
    try:
        # The whole file, not only the new tail: it also fills holes left by a
        # truncation while the tier was down.
        _fallocate(fd, 0, end)
        return "fallocate"
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConfigError(
                f"disk tier {tier!r}: {str(path)!r}: no space left to reserve "
                f"{format_size(end)}; lower capacity or num_blocks, or free some space"
            ) from None
        if e.errno not in _FALLOC_UNSUPPORTED:
            raise ConfigError(f"disk tier {tier!r}: {str(path)!r}: fallocate failed ({e})") from None
        if not zerofill:
            raise ConfigError(
                f"disk tier {tier!r}: {str(path)!r}: fallocate is not supported on this "
                f"filesystem ({e.strerror}); set zerofill_fallback: true "
                "(DYN_KVBM_DISK_ZEROFILL_FALLBACK=true) to reserve the file by writing zeros"
            ) from None
    if end > start:
        log.info("kvbm disk tier %r: fallocate unsupported on %s; writing %s of zeros",
                 tier, path, format_size(end - start))
        try:
            zero_fill(fd, start, end - start)
        except OSError as e:
            raise ConfigError(f"disk tier {tier!r}: {str(path)!r}: zero-fill failed ({e})") from None
    return "zerofill"


def open_stripe(
    tier: str,
    path: Path,
    want: Superblock,
    geom: Geometry,
    num_local: int,
    opts: FileOptions,
) -> tuple[StripeFile, str]:
    """Open or create one slot file, check what it was made for, size and reserve it.

    Returns the file and how its space was reserved. A file made for another stripe
    arrangement is started afresh (its blocks could sit in other slots now).
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    direct_at_open = opts.o_direct and opts.allocator_type == "open-direct"
    if direct_at_open:
        flags |= O_DIRECT
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if direct_at_open and e.errno == errno.EINVAL:
            raise ConfigError(
                f"disk tier {tier!r}: {str(path)!r}: O_DIRECT is not supported here "
                f"({e.strerror}); {_NO_DIRECT_FIX}, or give a directory on another filesystem"
            ) from None
        if e.errno == errno.ELOOP:
            raise ConfigError(f"disk tier {tier!r}: {str(path)!r} is a symlink; remove it") from None
        raise ConfigError(f"disk tier {tier!r}: cannot open {str(path)!r} ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        _refuse_foreign(tier, path, st, "is")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"disk tier {tier!r}: {str(path)!r} is not a regular file; remove it")
        os.fchmod(fd, 0o600)
        size = st.st_size
        buf = aligned_empty(SUPERBLOCK_BYTES)
        found = None
        if size >= SUPERBLOCK_BYTES and os.preadv(fd, [buf], 0) == SUPERBLOCK_BYTES:
            found = Superblock.unpack(memoryview(buf))
        if found != want:
            if size:
                log.warning("kvbm disk tier %r: %s was made for %s, not %s; starting it afresh",
                            tier, path, found, want)
                os.ftruncate(fd, 0)
            size = 0
        expected = geom.file_size(num_local)
        if size > expected:
            os.ftruncate(fd, expected)  # capacity lowered: slots past the end are dropped
            size = expected
        how = _reserve(tier, fd, path, size, expected, opts.zerofill_fallback)
        if found != want:
            np.copyto(buf, np.zeros(SUPERBLOCK_BYTES, np.uint8))
            want.pack(memoryview(buf))
            os.pwritev(fd, [buf], 0)
        if opts.o_direct and not direct_at_open:
            _set_direct(tier, fd, path)
        return StripeFile(want.stripe, path, fd, num_local, expected), how
    except BaseException:
        os.close(fd)
        raise


def probe_directory(tier: str, base: str, need: int, o_direct: bool) -> list[tuple[bool, str]]:
    """What ``kvbm config check --probe`` learns of one directory of the tier: whether a
    file can be made there (with ``O_DIRECT`` unless it is off), written, read and
    removed, and whether the filesystem has ``need`` bytes free. (ok, line) each;
    nothing is left behind (a missing directory is not made, its parent is looked at).
    """
    where = f"tier {tier!r}: path {base!r}"
    path = base
    while not os.path.lexists(path):
        parent = os.path.dirname(path.rstrip("/")) or "/"
        if parent == path:
            break
        path = parent
    if path != base:
        ok = os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)
        if not ok:
            return [(False, f"{where}: does not exist, and {path!r} is not a directory this "
                            "user may create it in; create it or give another directory")]
    try:
        fd = open_directory(path, create=False)
    except UnsafePath as e:
        return [(False, f"{where}: {e}")]
    except OSError as e:
        return [(False, f"{where}: cannot be opened ({e.strerror}); give a directory")]
    out: list[tuple[bool, str]] = []
    name = f".kvbm-probe-{os.getpid()}"
    try:
        free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        if path != base:
            out.append((True, f"{where}: does not exist yet; kvbm will create it in {path!r}"))
        else:
            try:
                f = os.open(name, flags | (O_DIRECT if o_direct else 0), 0o600, dir_fd=fd)
            except OSError as e:
                fix = _NO_DIRECT_FIX if o_direct and e.errno == errno.EINVAL else \
                    "give a directory this user may write"
                out.append((False, f"{where}: cannot create a file ({e.strerror}); {fix}"))
            else:
                try:
                    buf = aligned_empty(4096)
                    buf[:] = 0x6B
                    back = aligned_empty(4096)
                    good = os.pwritev(f, [buf], 0) == 4096 and os.preadv(f, [back], 0) == 4096 \
                        and bool((back == buf).all())
                    how = "O_DIRECT" if o_direct else "buffered"
                    out.append((good, f"{where}: a file was created, written, read back and "
                                      f"removed ({how})" if good else
                                      f"{where}: a file written there read back wrong; "
                                      "check the device"))
                except OSError as e:
                    fix = _NO_DIRECT_FIX if o_direct and e.errno == errno.EINVAL else \
                        "check the device and its filesystem"
                    out.append((False, f"{where}: writing a file failed ({e.strerror}); {fix}"))
                finally:
                    os.close(f)
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=fd)
        fits = need <= free
        out.append((fits, f"{where}: {format_size(free)} free, about {format_size(need)} "
                          "needed" + ("" if fits else "; lower capacity or num_blocks "
                                      "(DYN_KVBM_DISK_CACHE_GB) or free some space")))
    finally:
        os.close(fd)
    return out
