"""Secrets in raw config: recognised by key, kept only as ``SecretStr``, never shown.

The core keeps each tier's raw entry until the tier's plugin validates it (two-step
validation), and that entry is part of the settings everyone prints. So secrets are
wrapped the moment the skeleton sees them: a string (or a number YAML parsed from
one) becomes a ``SecretStr``; anything else given for a secret key (a list, a
mapping) becomes ``Hidden``, which the tier's model refuses without echoing it. A
URL's ``user:password@`` part is cut the same way.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import SecretStr

from .objectstore import redact_url

__all__ = ["Hidden", "hide_secrets", "is_secret_key", "shown"]

_SECRET_RE = re.compile(
    r"secret|password|passwd|credential|private_key|api_key|access_key|(^|_)token$", re.I)


def is_secret_key(key: object) -> bool:
    """Whether a config key holds a secret (``aws_secret_access_key``, ``*_token`` …)."""
    return isinstance(key, str) and bool(_SECRET_RE.search(key))


class Hidden:
    """A value of the wrong type given for a secret key: kept, but never printed."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"<hidden {self.kind}>"

    __str__ = __repr__


def _hide_value(value: Any) -> Any:
    if value is None or isinstance(value, (SecretStr, Hidden)):
        return value
    if isinstance(value, str):
        return SecretStr(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return SecretStr(str(value))  # YAML reads an all-digit secret as a number
    return Hidden(type(value).__name__)


def hide_secrets(data: Any) -> Any:
    """``data`` (raw config: dicts, lists, scalars) with every secret key's value wrapped
    and credentials cut out of every ``*url`` value; the input is not changed."""
    if isinstance(data, dict):
        out: dict[Any, Any] = {}
        for k, v in data.items():
            if is_secret_key(k):
                out[k] = _hide_value(v)
            elif isinstance(k, str) and k.lower().endswith("url") and isinstance(v, str):
                out[k] = redact_url(v)
            else:
                out[k] = hide_secrets(v)
        return out
    if isinstance(data, list):
        return [hide_secrets(v) for v in data]
    return data


def shown(value: Any, limit: int = 80) -> str:
    """``value`` as an error message shows it: ``repr``, cut at ``limit`` characters,
    and nothing of a secret."""
    if isinstance(value, SecretStr):
        return "(hidden)"
    if isinstance(value, Hidden):
        return f"(hidden {value.kind})"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
