"""Names that become file or object names, and directories kvbm makes where others can write.

A tier's directory often sits in a place other users can write: the disk tier's
default is under ``/tmp``, a rendezvous directory is shared by design. There another
user can plant a symlink named as kvbm's directory, pointing at a place of the
victim's, and wait for kvbm to chmod it and write files there. So every directory
kvbm makes is made and opened one component at a time relative to its parent's
descriptor (``mkdirat``/``openat``) with ``O_NOFOLLOW``: a symlink is followed only
when this user or root owns it (the admin's ``/mnt/cache -> /nvme0``), never one
another user planted, and the directory kvbm owns is checked for owner and mode
through its descriptor, so nothing can be swapped between the check and the use.

Names that end up in a path or an object key (an instance id, a tier name) are
checked by ``check_name``: no ``/``, no ``..``, no control characters.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat

__all__ = ["NAME_RULE", "UnsafePath", "check_name", "open_directory", "private_subdir",
           "shared_subdir"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: What ``check_name`` accepts, in words, for error messages.
NAME_RULE = ("1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
             "(it becomes part of a file or object name)")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class UnsafePath(Exception):
    """A directory kvbm would make or use is not safe; the message says why and the fix."""


def check_name(value: str) -> str:
    """``value`` if it is safe as one path component or object-key part, else ValueError."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(f"must be {NAME_RULE}")
    return value


def _trusted(uid: int) -> bool:
    # Root's symlinks are the system's layout; this user's are its own choice.
    return uid in (0, os.geteuid())


def open_directory(path: str, *, create: bool = True, mode: int = 0o700) -> int:
    """A descriptor of directory ``path``; missing components are made with ``mode``.

    Each component is opened relative to its parent's descriptor. A symlink on the
    way is followed only if this user or root owns it; a component that is not a
    directory, or a symlink another user owns, raises ``UnsafePath``. System errors
    (permission denied, read-only file system) raise ``OSError``.
    """
    full = os.path.abspath(path)
    fd = os.open("/", _DIR_FLAGS)
    walked = "/"
    try:
        for part in full.split("/"):
            if not part:
                continue
            walked = os.path.join(walked, part)
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise
                # One made by a racing process is checked below like any other.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            flags = _DIR_FLAGS
            if stat.S_ISLNK(st.st_mode):
                if not _trusted(st.st_uid):
                    raise UnsafePath(
                        f"{walked!r} is a symlink owned by uid {st.st_uid}, neither this user "
                        f"(uid {os.geteuid()}) nor root; kvbm does not follow it (another user "
                        "may have planted it): remove it or give a path without it")
            elif not stat.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{walked!r} is not a directory; give a directory path")
            else:
                flags |= os.O_NOFOLLOW
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"{walked!r} changed while kvbm opened it (a symlink or "
                                     "file was put there); remove it") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_subdir(parent_fd: int, name: str, display: str, mode: int) -> int:
    """Make (if missing) and open ``name`` in ``parent_fd`` without following a symlink."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=parent_fd)
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath(
                f"{display!r} is a symlink (owned by uid {st.st_uid}); kvbm never follows "
                "one there, since another user may have planted it: remove it") from None
        raise UnsafePath(f"{display!r} exists and is not a directory; remove it") from None


def check_parent(fd: int, display: str) -> None:
    """UnsafePath if the directory ``fd`` lets every user rename what others put there."""
    st = os.fstat(fd)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise UnsafePath(
            f"{display!r} is writable by every user and lacks the sticky bit, so anyone "
            "could replace what kvbm makes there; run chmod +t on it or give another directory")


def private_subdir(parent_fd: int, name: str, display: str) -> int:
    """A descriptor of ``name`` in ``parent_fd``: made 0700 if missing, refused when it is
    a symlink, not a directory, or owned by another user; its mode tightened to 0700."""
    check_parent(parent_fd, os.path.dirname(display) or display)
    fd = _open_subdir(parent_fd, name, display, 0o700)
    try:
        st = os.fstat(fd)
        me = os.geteuid()
        if st.st_uid != me:
            raise UnsafePath(
                f"{display!r} is owned by uid {st.st_uid}, not by this process (uid {me}); "
                "another user could read or swap the cached KV. Give a directory you own")
        if stat.S_IMODE(st.st_mode) != 0o700:
            # The umask or an older run may have left it open to others; KV is user data.
            os.fchmod(fd, 0o700)
        return fd
    except BaseException:
        os.close(fd)
        raise


def shared_subdir(parent_fd: int, name: str, display: str) -> int:
    """A descriptor of ``name`` in ``parent_fd`` that other instances share: made with the
    umask's mode if missing, refused when it is a symlink or not a directory, or when
    every user may rename what is in it."""
    check_parent(parent_fd, os.path.dirname(display) or display)
    fd = _open_subdir(parent_fd, name, display, 0o777)
    try:
        check_parent(fd, display)
        return fd
    except BaseException:
        os.close(fd)
        raise
