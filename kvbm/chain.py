"""The chain a config names, resolved: each tier's validated config, class, size and policies.

Validation runs in two steps (the core's skeleton, then each tier's own config model,
so an error names the tier and the key); each tier class then checks where it stands
in the chain (``Tier.check_chain``). The planner needs only the links (its registries
and filters); ``build_tiers`` makes each link's storage for the executor.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import KvbmSettings, TierConfig, tier_names, validate_tiers
from .errors import ConfigError, PluginError
from .layout import BlockLayout
from .plugins import Plugins
from .policy import AdmissionPolicy, AdmitAll
from .registry import BlockRegistry
from .tier import Tier, TierContext

log = logging.getLogger("kvbm")


@dataclass
class ChainLink:
    """One resolved tier entry: its validated config, class, size and policies."""

    name: str
    config: TierConfig
    tier_cls: type[Tier]
    num_blocks: int
    eviction: Any
    admission: AdmissionPolicy


def takes_capacity(factory: Any) -> bool:
    """Whether an admission filter's factory declares a ``capacity`` parameter."""
    try:
        return "capacity" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): it does not
        return False


def admission_options(factory: Any, options: dict[str, Any], capacity: int) -> dict[str, Any]:
    """The keywords an admission filter's factory is called with: the tier's options and,
    when the factory declares a ``capacity`` parameter, the tier's size in blocks (a
    filter that sizes itself by its tier, e.g. a reuse window of twice the tier). A
    factory without one gets the options alone, as before, so filters written for the
    older hook keep working; ``capacity`` given in the options wins."""
    if "capacity" in options or not takes_capacity(factory):
        return dict(options)
    return {**options, "capacity": capacity}


def resolve_chain(settings: KvbmSettings, plugins: Plugins, load: bool = True) -> list[ChainLink]:
    """Validate every tier (step two) and build its policies; warn on a chain that makes no sense."""
    if not settings.tiers:
        known = plugins.tiers.names()
        example = known[0] if known else "<type>"
        raise ConfigError(f"key 'tiers': the chain is empty; give at least one tier, e.g. "
                          f"[{{type: {example}, capacity: 4GiB}}] (installed tier types: "
                          f"{', '.join(known) or 'none; see `kvbm plugins`'})")
    layout = settings.layout()
    bb = layout.bytes_per_block
    links: list[ChainLink] = []
    names = tier_names(settings.tiers)
    # Every tier's type and keys checked first, all their errors in one line.
    configs = validate_tiers(settings.tiers, names, plugins.tiers)
    for spec, name, cfg in zip(settings.tiers, names, configs):
        n = cfg.resolve_num_blocks(bb)
        tier_cls: Any = plugins.tiers.get(spec.type).load() if load else Tier
        try:
            ev_cls = plugins.policies.get_kind("eviction", cfg.policy).load()
            eviction = ev_cls(n, **cfg.policy_options)
        except (PluginError, TypeError, ValueError) as e:
            raise ConfigError(f"tier {name!r}: key 'policy': value {cfg.policy!r}: {e}") from None
        adm_name = cfg.admission or tier_cls.default_admission
        admission: AdmissionPolicy
        if adm_name is None or adm_name == "all":
            admission = AdmitAll()
        else:
            try:
                adm_cls = plugins.policies.get_kind("admission", adm_name).load()
                admission = adm_cls(**admission_options(adm_cls, cfg.admission_options, n))
            except PluginError as e:
                if cfg.admission is None:
                    # The tier's default filter is not installed: admit all rather than
                    # refuse to start, and say so.
                    log.warning("kvbm tier %r: default admission %r unavailable (%s); admitting all",
                                name, adm_name, e)
                    admission = AdmitAll()
                else:
                    raise ConfigError(f"tier {name!r}: key 'admission': value {adm_name!r}: {e}") from None
            except (TypeError, ValueError) as e:
                raise ConfigError(f"tier {name!r}: key 'admission_options': {e}") from None
        links.append(ChainLink(name, cfg, tier_cls, n, eviction, admission))
    named = [(link.name, link.tier_cls) for link in links]
    for i, link in enumerate(links):
        link.tier_cls.check_chain(i, named, settings.write_through)
    if settings.write_through:
        for upper, lower in zip(links, links[1:]):
            if lower.num_blocks < upper.num_blocks:
                log.warning(
                    "kvbm: tier %r holds %d blocks, fewer than tier %r above it (%d); in a "
                    "write-through chain every block of %r is also written to %r, so raise "
                    "%r's capacity to at least %d blocks (%d bytes)",
                    lower.name, lower.num_blocks, upper.name, upper.num_blocks,
                    upper.name, lower.name, lower.name, upper.num_blocks, upper.num_blocks * bb,
                )
    return links


@dataclass(eq=False)
class TierState:
    """A tier of the chain as the planner sees it: registry, admission, capabilities, counters.

    ``tier`` is the storage object in a process that holds it (``KvBlockManager``); a
    planner that drives other processes' storage (vLLM's scheduler) has none.
    """

    name: str
    index: int
    cls: type[Tier]
    config: TierConfig
    registry: BlockRegistry
    admission: AdmissionPolicy
    tier: Any = None
    hits: int = 0
    lookups: int = 0
    rejected: int = 0
    stored: int = 0
    failed_writes: int = 0
    failed_reads: int = 0
    overflow_in: int = 0  # blocks written here because the tiers above were full
    skipped: int = 0  # admitted blocks this tier had no free slot for
    adopted: int = 0
    _last_warn: float = 0.0

    @property
    def shared(self) -> bool:
        return self.cls.shared

    @property
    def medium(self) -> str:
        return self.cls.medium

    def warn(self, msg: str, *args: Any) -> None:
        """Log a warning about this tier, at most once a second."""
        now = time.monotonic()
        if now - self._last_warn >= 1.0:
            self._last_warn = now
            log.warning("kvbm tier %r: " + msg, self.name, *args)


def tier_states(links: list[ChainLink], events: Any = None) -> list[TierState]:
    """The planner's view of every link: a fresh registry each, with its policies."""
    return [TierState(link.name, i, link.tier_cls, link.config,
                      BlockRegistry(link.name, link.num_blocks, link.eviction, events),
                      link.admission)
            for i, link in enumerate(links)]


def build_tiers(links: Sequence[Any], namespace: Any, layout: BlockLayout, *, rank: int = 0,
                tp_size: int = 1) -> list[Tier]:
    """Build the storage of every link of a resolved chain for tensor-parallel rank ``rank``.

    A tier whose storage is named by its config alone gets a per-rank config
    (``Tier.config_for_rank``). On an error every tier built so far is closed.
    """
    tiers: list[Tier] = []
    try:
        for link in links:
            cfg = link.config
            if tp_size > 1:
                cfg = link.tier_cls.config_for_rank(cfg, rank, tp_size)
            tiers.append(link.tier_cls(cfg, TierContext(link.name, namespace, layout,
                                                        link.num_blocks)))
    except BaseException:
        for t in reversed(tiers):
            with contextlib.suppress(Exception):
                t.close()
        raise
    return tiers
