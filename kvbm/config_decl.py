"""What tier plugins declare for the config, and how environment variables fold in.

The core names no tier type. A tier plugin declares, when it registers its type
(``TierRegistry.add(..., order=, env=, default=)``), the environment variables that set
its keys (``EnvAlias``: this is how Dynamo's ``DYN_KVBM_CPU_*`` and ``DYN_KVBM_DISK_*``
keep working), a tier of its type for the default chain, and its place in a chain.
``apply_dynamo_env`` folds those variables into a raw settings dict.

Dynamo's sizes name the chain: when the config names no chain, a size variable
(``names_chain``) makes the chain exactly the tiers such variables add, so
``DYN_KVBM_DISK_CACHE_GB`` without ``DYN_KVBM_CPU_CACHE_GB`` is Dynamo's disk-only
chain (the device offloads straight to disk), not the default host tier with a disk
below it. Dynamo variables kvbm cannot honour are listed in ``kvbm.config_env``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ConfigError
from .redact import is_secret_key

__all__ = ["DYNAMO_KEYS", "UNORDERED", "EnvAlias", "TierDeclaration", "TierDeclarations",
           "apply_dynamo_env", "decimal_gigabytes", "default_tiers", "truthy"]


@dataclass(frozen=True)
class EnvAlias:
    """An environment variable that sets one key of a tier type's config.

    Tier plugins declare them (``TierRegistry.add(..., env={"DYN_KVBM_CPU_CACHE_GB":
    EnvAlias("capacity", decimal_gigabytes)})``) so that Dynamo KVBM's variables keep
    working while the core names no tier type. ``key`` may be dotted
    (``admission_options.min_priority``); ``convert`` turns the variable's text into
    the value (a ``ValueError`` becomes a ``ConfigError`` naming the variable); ``also``
    sets further keys with it; ``when`` skips the variable unless it returns True (a
    flag set to false); ``adds_tier`` adds a tier of the type to a chain that lacks one,
    as Dynamo's ``DYN_KVBM_DISK_CACHE_GB`` enables a disk tier; ``every_tier`` sets the
    key on every tier of the type rather than on the first.

    ``names_chain``: the variable is one of the sizes that name the chain, as Dynamo's
    ``DYN_KVBM_CPU_CACHE_GB`` and ``DYN_KVBM_DISK_CACHE_GB`` do. When the config names
    no chain and such a variable is set, the chain holds only the tiers the variables
    add, not the default chain. ``alone``: keys set (unless set already) on the tier the
    variable added when that chain holds this tier and no other, e.g. Dynamo's
    disk-only chain admits every block (its frequency filter guards only the host's
    offloads to disk).
    """

    key: str
    convert: Callable[[str], Any] = str
    also: Mapping[str, Any] = field(default_factory=dict)
    when: Callable[[str], bool] | None = None
    adds_tier: bool = True
    every_tier: bool = False
    names_chain: bool = False
    alone: Mapping[str, Any] = field(default_factory=dict)


class TierDeclarations(Protocol):
    """What the config reads of the tier types plugins registered (a ``TierRegistry``)."""

    def declarations(self) -> list[TierDeclaration]:
        """Every tier type's declaration, in registration order."""
        ...


@dataclass(frozen=True)
class TierDeclaration:
    """What a tier type declares for the config: ``TierRegistry.add``'s ``order``,
    ``env`` and ``default``."""

    type: str
    order: int | None = None
    env: Mapping[str, EnvAlias] = field(default_factory=dict)
    default: Mapping[str, Any] | None = None


#: Where a tier type whose plugin declares no ``order`` sorts: after every declared one.
UNORDERED = 99


def decimal_gigabytes(text: str) -> int:
    """Bytes of a number of decimal gigabytes (10**9 bytes), as Dynamo's ``*_GB`` variables mean."""
    try:
        gb = float(text)
    except ValueError:
        raise ValueError("expected a number of gigabytes (10**9 bytes), e.g. 64 or 1.5") from None
    if not math.isfinite(gb) or gb <= 0:
        raise ValueError("expected a finite number of gigabytes above zero, e.g. 64 or 1.5")
    return int(gb * 10**9)


def truthy(text: str) -> bool:
    """True for 1, true, yes, on (any case): how Dynamo's flags are read."""
    return text.strip().lower() in ("1", "true", "yes", "on")


def default_tiers(types: TierDeclarations) -> list[dict[str, Any]]:
    """The chain used when the config names none: each type that declares a ``default``."""
    decls = sorted(types.declarations(), key=_order)
    return [{"type": d.type, **d.default} for d in decls if d.default is not None]


def _order(d: TierDeclaration) -> int:
    return UNORDERED if d.order is None else d.order


def _set_key(tier: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key, copying each nested mapping it passes (the caller's stay as given)."""
    *path, last = key.split(".")
    node = tier
    for part in path:
        child = dict(node.get(part) or {})
        node[part] = child
        node = child
    node[last] = value


def _declared_types(env: Mapping[str, str]) -> TierDeclarations:
    # Plugins import this module, so it imports them only when settings are read.
    from .plugins import build_plugins

    return build_plugins(env).tiers


_TIERS_EXAMPLE = "tiers: [{type: host, capacity: 4GiB}]"


def _raw_shown(v: Any) -> str:
    """A raw YAML value as a message shows it: short scalars as written, else their kind."""
    if v is None:
        return "null"
    if isinstance(v, (str, int, float, bool)) and len(repr(v)) < 40:
        return repr(v)
    if isinstance(v, dict):
        return "a mapping"
    return f"a {type(v).__name__}"


def _check_tier_list(tiers: Any) -> list[dict[str, Any]]:
    """``tiers`` as a list of mappings, else ConfigError saying how to write one."""
    if not isinstance(tiers, list):
        raise ConfigError(f"key 'tiers': value {_raw_shown(tiers)} is not a list of tiers; "
                          f"write e.g. {_TIERS_EXAMPLE}")
    for i, t in enumerate(tiers):
        if not isinstance(t, dict):
            raise ConfigError(f"key 'tiers.{i}': value {_raw_shown(t)} is not a mapping; write "
                              "each tier as {type: host, capacity: 4GiB}")
    return [dict(t) for t in tiers]


#: Dynamo's variables for settings keys that are not a tier's.
DYNAMO_KEYS = {
    "metrics": "DYN_KVBM_METRICS",
    "metrics_port": "DYN_KVBM_METRICS_PORT",
    "leader_worker_init_timeout_secs": "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS",
}


def apply_dynamo_env(
    data: dict[str, Any], env: Mapping[str, str], types: TierDeclarations | None = None
) -> dict[str, Any]:
    """Fold environment aliases (Dynamo's ``DYN_KVBM_*``) into ``data`` (a raw settings dict).

    The tier keys they set, the default chain and the order tiers are sorted in come
    from what the tier plugins declared (``types``; the installed plugins when None).
    A variable for a tier type the chain lacks adds that tier when its alias says so.
    When ``data`` names no chain and a ``names_chain`` variable is set, the chain is
    the tiers the variables add (``DYN_KVBM_DISK_CACHE_GB`` alone: disk only, as in
    Dynamo); else it is the default chain with those tiers added.
    """
    types = types if types is not None else _declared_types(env)
    decls = sorted(types.declarations(), key=_order)
    data = dict(data)
    aliases = [(var, d.type, a) for d in decls for var, a in d.env.items() if var in env]
    env_chain = "tiers" not in data and any(
        a.names_chain and (a.when is None or a.when(env[var])) for var, _, a in aliases)
    if "tiers" in data:
        tiers = _check_tier_list(data["tiers"])
    else:
        tiers = [] if env_chain else default_tiers(types)
    added: set[str] = set()  # tier types a variable added
    # Aliases that add a tier go first, so a flag applies to a tier another variable adds.
    for var, ttype, alias in sorted(aliases, key=lambda x: not x[2].adds_tier):
        raw = env[var]
        if alias.when is not None and not alias.when(raw):
            continue
        matches = [t for t in tiers if t.get("type") == ttype]
        if not matches:
            if not alias.adds_tier:
                continue
            tiers.append({"type": ttype})
            added.add(ttype)
            matches = [tiers[-1]]
        try:
            value = alias.convert(raw)
        except (ValueError, ArithmeticError, TypeError) as e:
            # The value is shown unless the key holds a secret.
            shown = "(hidden)" if is_secret_key(alias.key) else repr(raw)
            why = "expected a whole number, e.g. 1024" if alias.convert is int else str(e)
            raise ConfigError(
                f"{var}={shown}: not a valid value ({why}); {var} sets key {alias.key!r} of "
                f"the {ttype!r} tier"
            ) from None
        # A block-count override wins over a size: TierConfig.resolve_num_blocks
        # prefers num_blocks whichever source set it.
        for t in matches if alias.every_tier else matches[:1]:
            _set_key(t, alias.key, value)
            for k, v in alias.also.items():
                _set_key(t, k, v)
    if env_chain and len(tiers) == 1 and tiers[0].get("type") in added:
        for _, ttype, alias in aliases:
            if ttype == tiers[0]["type"]:
                for k, v in alias.alone.items():
                    tiers[0].setdefault(k, v)
    order = {d.type: _order(d) for d in decls}
    tiers.sort(key=lambda t: order.get(str(t.get("type")), UNORDERED))
    data["tiers"] = tiers
    for key, var in DYNAMO_KEYS.items():
        if var in env:
            data[key] = truthy(env[var]) if key == "metrics" else env[var]
    return data
