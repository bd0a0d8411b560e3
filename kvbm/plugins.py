"""Plugin discovery and the registries plugins fill. The only module that calls ``pm.hook``.

Built-in plugins (``DEFAULT_PLUGINS``) load first, then the entry points of the group
``kvbm.plugins`` sorted by name. The same (distribution, name) seen twice is loaded
once; two different objects under one name are an error naming both distributions.
``KVBM_DISABLE_PLUGIN_AUTOLOAD=1`` loads no entry point except those named in
``KVBM_PLUGINS=a,b``; ``KVBM_PLUGINS`` alone restricts autoload to those names.

Registries map names to lazy ``"module:attr"`` factories: listing plugins imports no
torch or boto3, and a missing extra surfaces as one line with the pip command.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .config import EnvAlias, TierConfig, TierDeclaration
from .errors import PluginError

if TYPE_CHECKING:
    from .manager import KvBlockManager

ENTRY_POINT_GROUP = "kvbm.plugins"
DEFAULT_PLUGINS: tuple[str, ...] = ("kvbm.builtin",)


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: the entry-point name, its module and where it came from."""

    name: str
    module: str
    distribution: str
    version: str
    note: str | None = None


@dataclass
class Entry:
    """One named thing a plugin registered (a tier type, a policy, a connector…)."""

    name: str
    kind: str
    factory: str
    plugin: PluginInfo
    config_model: type[Any] | None = None
    extra: str | None = None
    requires: tuple[str, ...] = ()
    description: str = ""

    def missing(self) -> list[str]:
        """Top-level modules this entry needs that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    @property
    def install_hint(self) -> str:
        """The pip command that installs what this entry needs: the extra of the
        distribution that registered it (kvbm's own, or a third party's)."""
        if not self.extra:
            return f"pip install {' '.join(self.requires)}"
        dist = self.plugin.distribution
        owner = dist if dist not in ("kvbm", "local", "unknown") else "kvbm"
        return f"pip install '{owner}[{self.extra}]'"

    @property
    def available(self) -> bool:
        """True when every module this entry needs is installed."""
        return not self.missing()

    def load(self) -> Any:
        """Import the factory; a missing package is a PluginError with the pip command."""
        missing = self.missing()
        if missing:
            raise PluginError(
                f"{self.kind} {self.name!r} needs {', '.join(missing)}, which is not installed: "
                f"{self.install_hint}"
            )
        mod_name, _, attr = self.factory.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise PluginError(
                f"{self.kind} {self.name!r}: importing {mod_name} failed ({e}); {self.install_hint}"
            ) from e
        try:
            return getattr(mod, attr)
        except AttributeError:
            raise PluginError(
                f"{self.kind} {self.name!r}: {mod_name} has no attribute {attr!r} "
                f"(factory {self.factory!r} of plugin {self.plugin.name!r})"
            ) from None


class _Registry:
    kind = "entry"

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._current: PluginInfo | None = None

    def _add(self, entry_name: str, entry: Entry) -> None:
        old = self._entries.get(entry_name)
        if old is not None:
            if (old.plugin.distribution, old.factory) == (entry.plugin.distribution, entry.factory):
                return
            raise PluginError(
                f"{self.kind} {entry_name!r} is registered twice: by plugin {old.plugin.name!r} "
                f"of distribution {old.plugin.distribution!r} ({old.factory}) and by plugin "
                f"{entry.plugin.name!r} of distribution {entry.plugin.distribution!r} "
                f"({entry.factory}); uninstall one or disable it with KVBM_PLUGINS"
            )
        self._entries[entry_name] = entry

    def _owner(self) -> PluginInfo:
        assert self._current is not None, "registries are filled only while plugins load"
        return self._current

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise PluginError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def names(self) -> list[str]:
        return sorted(self._entries)


@dataclass
class TierEntry(Entry):
    """A tier type, with what it declares for the config (``TierRegistry.add``)."""

    order: int | None = None
    env: Mapping[str, EnvAlias] = field(default_factory=dict)
    default: Mapping[str, Any] | None = None


class TierRegistry(_Registry):
    """Tier types by name; filled by ``kvbm_register_tiers``.

    Besides the class, a tier type declares what the config needs to know of it, so
    that the core names no tier type: its place in a chain (``order``), the
    environment variables that set its keys (``env``, e.g. Dynamo's), and whether the
    default chain holds it (``default``).
    """

    kind = "tier"

    def add(
        self,
        name: str,
        *,
        factory: str,
        config_model: type[TierConfig] = TierConfig,
        extra: str | None = None,
        requires: Sequence[str] = (),
        description: str = "",
        order: int | None = None,
        env: Mapping[str, EnvAlias] | None = None,
        default: Mapping[str, Any] | None = None,
    ) -> None:
        """Register tier type ``name``: a ``Tier`` subclass at ``factory`` ("module:Class").

        ``order`` sorts tiers of a chain, fastest first (gpu 0, host 1, disk 2, s3 3,
        remote 4; types without one go last). ``env`` maps an environment variable to the
        key it sets (``{"DYN_KVBM_DISK_CACHE_DIR": EnvAlias("path")}``); a variable
        belongs to one tier type. ``default`` puts a tier of this type, with these keys,
        in the chain used when a config names none (``{"capacity": "4GiB"}``).
        """
        if not (isinstance(config_model, type) and issubclass(config_model, TierConfig)):
            raise PluginError(f"tier {name!r}: config_model must subclass kvbm.TierConfig")
        env = dict(env or {})
        for var, alias in env.items():
            if not isinstance(alias, EnvAlias):
                raise PluginError(
                    f"tier {name!r}: env[{var!r}] must be a kvbm.config.EnvAlias, got "
                    f"{type(alias).__name__}"
                )
            for other in self:
                assert isinstance(other, TierEntry)
                if other.name != name and var in other.env:
                    raise PluginError(
                        f"environment variable {var} is declared by tier {other.name!r} of "
                        f"plugin {other.plugin.name!r} (distribution "
                        f"{other.plugin.distribution!r}) and by tier {name!r} of plugin "
                        f"{self._owner().name!r} (distribution {self._owner().distribution!r}); "
                        "uninstall one or disable it with KVBM_PLUGINS"
                    )
        self._add(name, TierEntry(name, "tier", factory, self._owner(), config_model, extra,
                                  tuple(requires), description, order, env,
                                  None if default is None else dict(default)))

    def declarations(self) -> list[TierDeclaration]:
        """What each tier type declared for the config, in registration order."""
        return [TierDeclaration(e.name, e.order, e.env, e.default)
                for e in self if isinstance(e, TierEntry)]


class PolicyRegistry(_Registry):
    """Eviction policies and admission filters; filled by ``kvbm_register_policies``."""

    kind = "policy"

    def add(
        self,
        name: str,
        *,
        kind: str,
        factory: str,
        extra: str | None = None,
        requires: Sequence[str] = (),
        description: str = "",
    ) -> None:
        """Register an ``"eviction"`` policy or an ``"admission"`` filter under ``name``."""
        if kind not in ("eviction", "admission"):
            raise PluginError(f"policy {name!r}: kind must be 'eviction' or 'admission', got {kind!r}")
        self._add(f"{kind}:{name}", Entry(name, kind, factory, self._owner(), None, extra,
                                          tuple(requires), description))

    def get_kind(self, kind: str, name: str) -> Entry:
        """The ``kind`` ("eviction" or "admission") policy ``name``; PluginError naming the known ones."""
        try:
            return self._entries[f"{kind}:{name}"]
        except KeyError:
            known = ", ".join(sorted(e.name for e in self if e.kind == kind)) or "none"
            raise PluginError(f"unknown {kind} policy {name!r}; known: {known}") from None


class LayoutRegistry(_Registry):
    """Engine-side layouts; filled by ``kvbm_register_layouts``."""

    kind = "layout"

    def add(self, name: str, *, factory: str, extra: str | None = None,
            requires: Sequence[str] = (), description: str = "") -> None:
        """Register a layout class (a ``BlockSource``/``BlockDestination``) under ``name``."""
        self._add(name, Entry(name, "layout", factory, self._owner(), None, extra,
                              tuple(requires), description))


class ConnectorRegistry(_Registry):
    """Engine connectors; filled by ``kvbm_register_connectors``."""

    kind = "connector"

    def add(self, name: str, *, factory: str, extra: str | None = None,
            requires: Sequence[str] = (), description: str = "") -> None:
        """Register an engine connector under ``name``."""
        self._add(name, Entry(name, "connector", factory, self._owner(), None, extra,
                              tuple(requires), description))


class CommandRegistry(_Registry):
    """Subcommands of the ``kvbm`` command; filled by ``kvbm_register_commands``."""

    kind = "command"
    #: The core's own subcommands, which no plugin may take.
    RESERVED = frozenset({"plugins", "plugin", "config"})

    def add(self, name: str, *, factory: str, extra: str | None = None,
            requires: Sequence[str] = (), description: str = "") -> None:
        """Register ``kvbm NAME``: ``factory`` ("module:function") is imported only when
        that subcommand runs; it is called with the subcommand's ``ArgumentParser``, adds
        its arguments and returns the function that runs it (``Namespace`` → exit code)."""
        if name in self.RESERVED or not name or name.startswith("-"):
            raise PluginError(
                f"command {name!r} of plugin {self._owner().name!r}: the name is kvbm's own "
                f"or not a command name; choose another (kvbm's own: {', '.join(sorted(self.RESERVED))})"
            )
        self._add(name, Entry(name, "command", factory, self._owner(), None, extra,
                              tuple(requires), description))


@dataclass
class Plugins:
    """A built plugin manager and the registries its plugins filled."""

    pm: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)
    tiers: TierRegistry = field(default_factory=TierRegistry)
    policies: PolicyRegistry = field(default_factory=PolicyRegistry)
    layouts: LayoutRegistry = field(default_factory=LayoutRegistry)
    connectors: ConnectorRegistry = field(default_factory=ConnectorRegistry)
    commands: CommandRegistry = field(default_factory=CommandRegistry)

    def entries_of(self, plugin: PluginInfo) -> list[Entry]:
        """Everything ``plugin`` registered."""
        out: list[Entry] = []
        for reg in (self.tiers, self.policies, self.layouts, self.connectors, self.commands):
            out.extend(e for e in reg if e.plugin == plugin)
        return out

    def chain_built(self, manager: KvBlockManager) -> None:
        """Run ``kvbm_chain_built`` on every plugin."""
        self.pm.hook.kvbm_chain_built(manager=manager)

    def shutdown(self, manager: KvBlockManager) -> None:
        """Run ``kvbm_shutdown`` on every plugin."""
        self.pm.hook.kvbm_shutdown(manager=manager)


def _selected_entry_points(env: Mapping[str, str]) -> list[md.EntryPoint]:
    only = {n.strip() for n in env.get("KVBM_PLUGINS", "").split(",") if n.strip()}
    autoload = env.get("KVBM_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in ("1", "true", "yes")
    eps = sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    if not autoload:
        return [ep for ep in eps if ep.name in only]
    return [ep for ep in eps if not only or ep.name in only]


def build_plugins(env: Mapping[str, str] | None = None, extra_plugins: Sequence[ModuleType] = ()) -> Plugins:
    """Build a fresh plugin manager: built-ins, entry points, then ``extra_plugins``.

    Called by every manager (and by every engine process); nothing is built at import.
    """
    env = os.environ if env is None else env
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    result = Plugins(pm)
    version = _dist_version("kvbm")
    loaded: dict[str, tuple[PluginInfo, Any]] = {}

    def register(obj: Any, info: PluginInfo) -> None:
        prev = loaded.get(info.name)
        if prev is not None:
            if prev[1] is obj:
                return  # the same plugin reached twice (built-in and entry point)
            raise PluginError(
                f"plugin name {info.name!r} is taken twice: by {prev[0].module} of distribution "
                f"{prev[0].distribution!r} and by {info.module} of distribution "
                f"{info.distribution!r}; uninstall one or choose with KVBM_PLUGINS"
            )
        if any(other is obj for _, other in loaded.values()):
            return
        note = getattr(obj, "KVBM_PLUGIN_NOTE", None)
        info = PluginInfo(info.name, info.module, info.distribution, info.version, note)
        loaded[info.name] = (info, obj)
        pm.register(obj, name=info.name)
        result.plugins.append(info)

    for mod_name in DEFAULT_PLUGINS:
        register(importlib.import_module(mod_name), PluginInfo(mod_name.rsplit(".", 1)[-1], mod_name, "kvbm", version))
    seen: set[tuple[str, str]] = set()
    for ep in _selected_entry_points(env):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        if (dist, ep.name) in seen:
            continue
        seen.add((dist, ep.name))
        try:
            obj = ep.load()
        except Exception as e:
            raise PluginError(
                f"plugin {ep.name!r} of distribution {dist!r} failed to import {ep.value}: {e}"
            ) from e
        dver = ep.dist.version if ep.dist is not None else "?"
        register(obj, PluginInfo(ep.name, ep.value, dist, dver))
    for mod in extra_plugins:
        register(mod, PluginInfo(mod.__name__, mod.__name__, "local", "-"))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        # A decorated function whose name is no hook (a typo): one line naming it.
        owner = next((i for i, o in loaded.values() if o is e.plugin), None)
        where = (f"plugin {owner.name!r} of distribution {owner.distribution!r}"
                 if owner is not None else "a plugin")
        hooks = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("kvbm_")))
        raise PluginError(f"{where}: {e}; @kvbm.hookimpl functions must be named after one "
                          f"of kvbm's hooks: {hooks}") from None

    registries: list[tuple[str, _Registry]] = [
        ("kvbm_register_tiers", result.tiers),
        ("kvbm_register_policies", result.policies),
        ("kvbm_register_layouts", result.layouts),
        ("kvbm_register_connectors", result.connectors),
        ("kvbm_register_commands", result.commands),
    ]
    for info, obj in loaded.values():
        others = [o for _, o in loaded.values() if o is not obj]
        for hook_name, reg in registries:
            caller = pm.subset_hook_caller(hook_name, remove_plugins=others)
            reg._current = info
            try:
                caller(registry=reg)
            finally:
                reg._current = None
    return result


def _dist_version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "0+unknown"
