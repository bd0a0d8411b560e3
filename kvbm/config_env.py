"""Environment variables kvbm reads, and the ones it refuses to ignore.

pydantic-settings reads ``KVBM_<KEY>`` (and ``KVBM_<KEY>__<SUBKEY>``) for the keys it
knows and ignores every other name, so ``KVBM_PAGESIZE=32`` would start a chain with
the default page size and nobody would know. ``check_environment`` refuses any
``KVBM_*`` variable kvbm does not read (unless the YAML file refers to it as
``$VAR``), with the name it probably meant, and a ``DYN_KVBM_*`` variable that is
one typo away from one it reads. Other ``DYN_KVBM_*`` variables belong to Dynamo's
own KVBM and are left alone, so a Dynamo environment keeps working unchanged.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable, Mapping

from pydantic import BaseModel

from .config_errors import models_in
from .errors import ConfigError

__all__ = ["OWN_VARIABLES", "check_environment", "settings_variables"]

#: Variables the core reads itself (not settings keys).
OWN_VARIABLES = frozenset({"KVBM_CONFIG", "KVBM_PLUGINS", "KVBM_DISABLE_PLUGIN_AUTOLOAD"})
# A DYN_KVBM_* name this close to one kvbm reads is a typo, not one of Dynamo's others.
_TYPO_CUTOFF = 0.9


def settings_variables(settings_cls: type[BaseModel], prefix: str = "KVBM_") -> set[str]:
    """``KVBM_<KEY>`` for every settings key, and ``KVBM_<KEY>__<SUBKEY>`` for nested models."""
    out: set[str] = set()
    for name, field in settings_cls.model_fields.items():
        var = f"{prefix}{name.upper()}"
        out.add(var)
        if typing.get_origin(field.annotation) is list:
            continue  # a list of models (tiers) is set as one JSON value only
        for sub in models_in(field.annotation):
            out |= settings_variables(sub, var + "__")
    return out


def check_environment(env: Mapping[str, str], known: Iterable[str],
                      referenced: Iterable[str] = ()) -> None:
    """ConfigError for a ``KVBM_*`` variable kvbm does not read, or a ``DYN_KVBM_*`` one a
    typo away from one it does. ``known``: every variable read; ``referenced``: those the
    YAML file uses as ``$VAR`` (the user's own, e.g. a secret). Values are never shown:
    an unknown variable may hold anything."""
    known_set = {k.upper() for k in known}
    used = set(referenced)
    kvbm_known = sorted(k for k in known_set if k.startswith("KVBM_"))
    dyn_known = sorted(k for k in known_set if k.startswith("DYN_KVBM_"))
    for var in sorted(env):
        up = var.upper()
        if up in known_set or var in used:
            continue
        if up.startswith("KVBM_"):
            close = difflib.get_close_matches(up, kvbm_known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else (
                "settings are KVBM_<KEY>, nested ones KVBM_<KEY>__<SUBKEY>, e.g. "
                "KVBM_PAGE_SIZE or KVBM_MODEL__NUM_LAYERS")
            raise ConfigError(
                f"environment variable {var}: kvbm reads no such variable; {hint} "
                "(unset it, or refer to it as ${" + var + "} in the config file if it is yours)")
        if up.startswith("DYN_KVBM_"):
            close = difflib.get_close_matches(up, dyn_known, n=1, cutoff=_TYPO_CUTOFF)
            if close:
                raise ConfigError(
                    f"environment variable {var}: kvbm reads no such variable; did you mean "
                    f"{close[0]}? (unset it or fix its name)")
