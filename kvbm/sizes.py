"""Byte sizes as people write them in config: ``64GiB``, ``100GB``, ``512MiB``, ``4096``."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Return ``value`` in bytes; raise ``ValueError`` naming the allowed forms."""
    if isinstance(value, bool):
        raise ValueError(f"size {value!r} is not a size; use bytes or a string like '64GiB'")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"size {value!r} is not a finite number; use bytes or a string "
                             "like '64GiB'")
        n = float(value)
    else:
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"size {value!r} is not understood; use an integer of bytes or a number with "
                "a unit: B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2)"
            )
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"size {value!r} must be greater than zero")
    return int(n)


def format_size(n: int) -> str:
    """Human form of a byte count, in powers of two."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")
