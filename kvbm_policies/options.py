"""Parsing of policy options from YAML or environment strings, with one-line errors.

Options arrive as YAML values or, through ``DYN_KVBM_*`` variables, as strings; every
parser accepts both. Each error names the option, the value and the allowed range; the
manager prefixes it with the tier and the config key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def reject_unknown(policy: str, options: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise ValueError naming the first option ``policy`` does not take."""
    allowed = sorted(allowed)
    for key in options:
        if key not in allowed:
            known = ", ".join(allowed) or "none"
            raise ValueError(f"{policy}: unknown option {key!r}; allowed options: {known}")


def int_option(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (``hi`` None: no upper bound); strings allowed."""
    rng = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
    if isinstance(value, bool):
        raise ValueError(f"option {name!r}: value {value!r} is not an integer; give an integer {rng}")
    try:
        if isinstance(value, str):
            v = int(value.strip())
        elif isinstance(value, float) and value.is_integer():
            v = int(value)
        elif isinstance(value, int):
            v = value
        else:
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"option {name!r}: value {value!r} is not an integer; give an integer {rng}") from None
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"option {name!r}: value {v} is out of range; give an integer {rng}")
    return v


def float_option(
    name: str, value: Any, lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
) -> float:
    """``value`` as a float within the given bounds (open or closed); strings allowed."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    rng = f"in {left}{lo}, {hi}{right}" if hi is not None else f"{'>' if lo_open else '>='} {lo}"
    if isinstance(value, bool):
        raise ValueError(f"option {name!r}: value {value!r} is not a number; give a number {rng}")
    try:
        v = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name!r}: value {value!r} is not a number; give a number {rng}") from None
    bad = v != v or (v <= lo if lo_open else v < lo)
    if hi is not None:
        bad = bad or (v >= hi if hi_open else v > hi)
    if bad:
        raise ValueError(f"option {name!r}: value {value!r} is out of range; give a number {rng}")
    return v
