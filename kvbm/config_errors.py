"""Validation errors as one line each: the key, where the value came from, the value
(never a secret's), what is wrong, and for an unknown key the key it probably meant.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from .redact import Hidden, is_secret_key, shown

__all__ = ["did_you_mean", "format_validation_error", "model_at", "models_in"]

_PREFIX_RE = re.compile(r"^(Value error|Assertion failed), ")


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known``, or ``""``."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (through Optional, list, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += models_in(arg)
    return out


def model_at(model: type[BaseModel] | None, loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model whose fields the key at ``loc`` is looked up in (list indices skipped)."""
    cur = model
    for part in loc:
        if cur is None:
            return None
        if isinstance(part, int):
            continue
        field = cur.model_fields.get(str(part))
        if field is None:
            return None
        found = models_in(field.annotation)
        cur = found[0] if found else None
    return cur


def _message(err: Any) -> str:
    msg = _PREFIX_RE.sub("", str(err["msg"])).replace("\n", " ")
    return msg[:1].lower() + msg[1:]


def format_validation_error(
    e: ValidationError,
    prefix: str = "",
    model: type[BaseModel] | None = None,
    source_of: Callable[[tuple[Any, ...]], str | None] | None = None,
) -> str:
    """Every error of ``e`` as ``{prefix}key 'a.b' (from VAR): value V: what is wrong``,
    joined by ``; `` on one line.

    ``model`` is the model validated (for the keys an unknown key may have meant);
    ``source_of(loc)`` names the environment variable a value came from, if any.
    """
    lines: list[str] = []
    for err in e.errors(include_url=False):
        loc = tuple(err["loc"])
        key = ".".join(str(x) for x in loc)
        src = source_of(loc) if source_of is not None and loc else None
        origin = f" (from {src})" if src else ""
        kind = err["type"]
        if not loc:
            line = f"{prefix}{_message(err)}"
        elif kind == "extra_forbidden":
            parent = model_at(model, loc[:-1])
            known = sorted(parent.model_fields) if parent is not None else []
            hint = did_you_mean(str(loc[-1]), known)
            if not hint and known:
                hint = f"; known keys: {', '.join(known)}"
            line = f"{prefix}key {key!r}{origin}: unknown key{hint}"
        elif kind == "missing":
            line = f"{prefix}key {key!r}: missing; it is required"
        else:
            value = err.get("input")
            if isinstance(value, Hidden):
                lines.append(f"{prefix}key {key!r}{origin}: value {shown(value)}: a secret is "
                             f"one string, not a {value.kind}; write e.g. {loc[-1]}: "
                             "${MY_SECRET} and export MY_SECRET")
                continue
            if any(is_secret_key(p) for p in loc):
                what = ": value (hidden)"
            elif isinstance(value, dict):
                what = ""
            else:
                what = f": value {shown(value)}"
            line = f"{prefix}key {key!r}{origin}{what}: {_message(err)}"
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)
