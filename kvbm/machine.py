"""What this machine has room for: memory (the container's limit included) and disk space.

Config checks compare a chain's sizes with these before anything is allocated, so a
capacity the machine cannot hold is one clear line at start-up instead of ENOMEM,
an OOM kill or ENOSPC later.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["free_space", "memory_available", "memory_total"]

# cgroup v2 (and v1) files that bound a container's memory below the machine's.
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_CGROUP_USAGE = ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes")


def _meminfo(field: str) -> int | None:
    """A field of /proc/meminfo in bytes, or None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _first_int(paths: tuple[str, ...]) -> int | None:
    for p in paths:
        try:
            text = Path(p).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def _cgroup_limit() -> int | None:
    limit = _first_int(_CGROUP_LIMITS)
    # cgroup v1 writes a huge number (about 2**63) for "no limit"; v2 writes "max".
    if limit is None or limit >= 1 << 60:
        return None
    return limit


def memory_total() -> int:
    """Bytes of memory this process may use at most: the machine's, or its container's limit."""
    total = _meminfo("MemTotal")
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 1 << 62  # unknown: never refuse on a guess
    limit = _cgroup_limit()
    return min(total, limit) if limit is not None else total


def memory_available() -> int:
    """Bytes that can be allocated now without swapping (the kernel's MemAvailable),
    bounded by what the container's limit leaves."""
    avail = _meminfo("MemAvailable")
    if avail is None:
        avail = memory_total()
    limit = _cgroup_limit()
    if limit is not None:
        used = _first_int(_CGROUP_USAGE) or 0
        avail = min(avail, max(0, limit - used))
    return avail


def free_space(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    sv = os.statvfs(path)
    return sv.f_bavail * sv.f_frsize
