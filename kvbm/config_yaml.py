"""Reading a YAML config file: bounded, without aliases, with ``$VAR`` only in values.

A config file is small and written by hand, so the reader refuses what only an
accident or an attack produces:

- files above ``MAX_CONFIG_BYTES`` and nesting deeper than ``MAX_DEPTH``;
- anchors and aliases: a few hundred bytes of nested aliases expand into billions of
  nodes the moment anything walks the result (a "billion laughs" file);
- a key given twice in one mapping (YAML keeps the last one silently);
- tags beyond plain YAML (``SafeLoader`` refuses ``!!python/...``).

``$VAR`` and ``${VAR}`` are replaced by the environment's value in scalar *values*
only, after parsing: never in keys, never in single-quoted scalars (as in a shell,
single quotes are literal), and never as YAML syntax, so a variable's value cannot
add keys or tiers. ``$$`` is a literal ``$``. An unset variable stays as written;
keys that take secrets refuse such a leftover (``kvbm.objectstore.reject_unexpanded``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import ConfigError

__all__ = ["MAX_CONFIG_BYTES", "MAX_DEPTH", "expand_vars", "read_yaml"]

#: The largest config file read (a real one is a few KiB).
MAX_CONFIG_BYTES = 1 << 20
#: The deepest nesting of mappings and lists accepted (a real config nests 3 or 4).
MAX_DEPTH = 32

_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_STR_TAG = "tag:yaml.org,2002:str"


class _Refused(yaml.YAMLError):  # type: ignore[misc]  # PyYAML ships no types
    """What the strict loader refuses, with the line it is on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _line(node_or_event: Any) -> int:
    mark = getattr(node_or_event, "start_mark", None)
    return int(mark.line) + 1 if mark is not None else 0


class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc]
    """``SafeLoader`` that refuses anchors and aliases and bounds the nesting depth."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(
                f"alias '*{event.anchor}' at line {_line(event)}: anchors and aliases are not "
                "accepted (nested ones expand a small file into a huge config); write the value out")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _Refused(
                f"anchor '&{anchor}' at line {_line(event)}: anchors and aliases are not "
                "accepted (nested ones expand a small file into a huge config); write the value out")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nesting deeper than {MAX_DEPTH} levels at line {_line(event)}; "
                               "a kvbm config nests a few levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def expand_vars(text: str, env: Callable[[str], str | None], used: set[str] | None = None) -> str:
    """``text`` with ``$VAR`` and ``${VAR}`` replaced by ``env(VAR)`` where it is set
    (left as written where not) and ``$$`` by ``$``; names looked up go into ``used``."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name is None:
            return "$"
        if used is not None:
            used.add(name)
        value = env(name)
        return m.group(0) if value is None else value

    return _VAR_RE.sub(sub, text)


def _walk(node: Node, expand: Callable[[str], str]) -> None:
    """Expand variables in scalar values below ``node``; refuse a key given twice."""
    if isinstance(node, MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, ScalarNode):
                if key.value in seen:
                    first, again = seen[key.value], _line(key)
                    lines = f"line {again}" if first == again else f"lines {first} and {again}"
                    raise _Refused(
                        f"key {key.value!r} is given twice in one mapping ({lines}); YAML would "
                        "keep only the last: remove one")
                seen[key.value] = _line(key)
            _walk(value, expand)
    elif isinstance(node, SequenceNode):
        for item in node.value:
            _walk(item, expand)
    # Single-quoted scalars are literal, as in a shell; only strings are expanded
    # (a plain `$PORT` is resolved as a string, so it is one too).
    elif (isinstance(node, ScalarNode) and node.style != "'" and node.tag == _STR_TAG
          and "$" in node.value):
        node.value = expand(node.value)


def read_yaml(path: str | os.PathLike[str], used: set[str] | None = None,
              origin: str = "") -> dict[str, Any]:
    """A YAML config file as a dict; a one-line ``ConfigError`` for anything else.

    ``used`` collects the environment variables the file refers to; ``origin`` says
    where the path came from (``" (KVBM_CONFIG)"``) in messages.
    """
    where = f"config file {os.fspath(path)!r}{origin}"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read ({e.strerror}); give the path of a "
                          "readable YAML file") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a kvbm config "
                          "is a few KiB: is this the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _walk(node, lambda s: expand_vars(s, os.environ.get, used))
        data = loader.construct_document(node) if node is not None else None
    except _Refused as e:
        raise ConfigError(f"{where}: {e.message}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        hint = ""
        lines = text.splitlines()
        if mark is not None and mark.line < len(lines) and "${" in lines[mark.line]:
            # A plain scalar ends at '{' or '}' inside a flow collection.
            hint = "; inside {...} or [...] write a ${VAR} value in double quotes"
        raise ConfigError(f"{where}: YAML syntax error{at}: {problem}{hint}") from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(f"{where}: is empty; write at least a chain, e.g. "
                          "'tiers: [{type: host, capacity: 4GiB}]', or name no file to run "
                          "the default chain")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys at the top (model, page_size, "
                          f"tiers, ...), got a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: key {bad[0]!r} is not a name; keys are words like page_size")
    return data
