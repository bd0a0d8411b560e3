"""Environment variables kvbm reads, and the ones it refuses to ignore.

pydantic-settings reads ``KVBM_<KEY>`` (and ``KVBM_<KEY>__<SUBKEY>``) for the keys it
knows and ignores every other name, so ``KVBM_PAGESIZE=32`` would start a chain with
the default page size and nobody would know. ``check_environment`` refuses any
``KVBM_*`` variable kvbm does not read (unless the YAML file refers to it as
``$VAR``), with the name it probably meant, and a ``DYN_KVBM_*`` variable that is
one typo away from one it reads.

Dynamo's KVBM documents variables kvbm cannot honour (``REFUSED_DYNAMO``: NCCL's MLA
broadcast, ZMQ ports, NIXL backends, transfer batching ...). Each one set is refused
with one WARNING line, logged once per process, naming the variable, its value and
why kvbm ignores it; start-up goes on. An error would be wrong here: Dynamo users set
these in environment files shared by every engine, and none of them changes which
bytes a hit returns, only how Dynamo would move or report them. Any other
``DYN_KVBM_*`` variable gets the same one-line warning (kvbm knows no such variable).
The table of every variable and what kvbm does with it is docs/dynamo.md.
"""

from __future__ import annotations

import difflib
import logging
import threading
import typing
from collections.abc import Iterable, Mapping

from pydantic import BaseModel

from .config_errors import models_in
from .errors import ConfigError

__all__ = ["OWN_VARIABLES", "REFUSED_DYNAMO", "REFUSED_DYNAMO_PREFIXES", "check_environment",
           "refusal", "settings_variables", "warn_once"]

log = logging.getLogger("kvbm.config")

#: Variables kvbm's own code reads outside the settings (``KVBM_FIO``: the fio binary
#: ``kvbm bench`` measures a disk limit with).
OWN_VARIABLES = frozenset({"KVBM_CONFIG", "KVBM_PLUGINS", "KVBM_DISABLE_PLUGIN_AUTOLOAD",
                           "KVBM_FIO"})
# A DYN_KVBM_* name this close to one kvbm reads is a typo, not one of Dynamo's others.
_TYPO_CUTOFF = 0.9

_MLA = ("each rank loads its own copy of the replicated MLA blocks from kvbm's tiers "
        "(the same bytes, without rank 0's NCCL broadcast)")
_ZMQ = ("kvbm's leader and workers talk through the engine's own channels (vLLM's "
        "connector metadata, TensorRT-LLM's allgather), not a ZMQ socket")
_BATCH = ("kvbm batches one engine step's blocks per copy; set io_threads / copy_threads "
          "(KVBM_IO_THREADS, KVBM_COPY_THREADS) to tune it")
_STATS = "kvbm's cache-hit counters are Prometheus metrics (metrics: true), not log lines"

#: Dynamo KVBM variables kvbm cannot honour, and why: each set one is one WARNING line.
REFUSED_DYNAMO: dict[str, str] = {
    "DYN_KVBM_NCCL_MLA_MODE": _MLA,
    "DYN_KVBM_ENABLE_RECORD": "kvbm has no recorder of its calls; its KV events "
                              "(kv_events) and metrics show what it did",
    "DYN_KVBM_LEADER_ZMQ_HOST": _ZMQ,
    "DYN_KVBM_LEADER_ZMQ_PUB_PORT": _ZMQ,
    "DYN_KVBM_LEADER_ZMQ_ACK_PORT": _ZMQ,
    "DYN_KVBM_TRTLLM_ZMQ_PORT": _ZMQ,
    "DYN_KVBM_TRANSFER_BATCH_SIZE": _BATCH,
    "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": _BATCH,
    "DYN_KVBM_MAX_CONCURRENT_TRANSFERS": _BATCH,
    "DYN_KVBM_CACHE_STATS_MAX_REQUESTS": _STATS,
    "DYN_KVBM_CACHE_STATS_LOG_INTERVAL_SECS": _STATS,
    "DYN_KVBM_KV_EVENTS_ENABLE_CONSOLIDATOR": (
        "kvbm publishes its own blocks in vLLM's KV-event format (kv_events: {enabled: "
        "true}); it does not merge the engine's events"),
}
#: Families of Dynamo variables (a name prefix) kvbm cannot honour, and why.
REFUSED_DYNAMO_PREFIXES: dict[str, str] = {
    "DYN_KVBM_NIXL_BACKEND_": (
        "kvbm's disk tier does its own I/O (io_engine: posix or nixl's POSIX backend) and "
        "its remote tier picks NIXL's backend itself"),
}
_UNKNOWN_DYN = ("kvbm knows no such variable (docs/dynamo.md lists the Dynamo variables "
                "it reads or refuses)")

_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(line: str) -> bool:
    """Log ``line`` as a WARNING unless this process logged it already; True if logged."""
    with _warned_lock:
        if line in _warned:
            return False
        _warned.add(line)
    log.warning("%s", line)
    return True


def refusal(var: str, value: str, known: Iterable[str] = ()) -> str | None:
    """The one line refusing a ``DYN_KVBM_*`` variable kvbm does not honour, or None when
    kvbm reads it (``known``) or it is not a ``DYN_KVBM_*`` name. The value is shown
    only for refused variables Dynamo documents (none holds a secret); an unknown
    variable's value may hold anything."""
    up = var.upper()
    if not up.startswith("DYN_KVBM_") or up in {k.upper() for k in known}:
        return None
    why = REFUSED_DYNAMO.get(up) or next(
        (w for p, w in REFUSED_DYNAMO_PREFIXES.items() if up.startswith(p)), None)
    if why is None:
        return f"kvbm ignores {var} (value not shown): {_UNKNOWN_DYN}"
    return f"kvbm ignores {var}={value!r}: {why}"


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
    dyn_known = sorted(k for k in known_set | set(REFUSED_DYNAMO) if k.startswith("DYN_KVBM_"))
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
            refused = up in REFUSED_DYNAMO or up.startswith(tuple(REFUSED_DYNAMO_PREFIXES))
            if close and not refused:
                raise ConfigError(
                    f"environment variable {var}: kvbm reads no such variable; did you mean "
                    f"{close[0]}? (unset it or fix its name)")
    # Only once nothing was refused: a start-up that fails logs its error line alone.
    for var in sorted(env):
        line = refusal(var, env[var], known_set)
        if line is not None and var not in used:
            warn_once(line)
