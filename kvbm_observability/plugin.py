"""Starts a manager's KV-event publisher and Prometheus endpoint when its settings ask.

``kv_events.enabled`` starts a ZMQ publisher (``kvbm_observability.kv_events``);
``metrics`` (or ``DYN_KVBM_METRICS=true``) starts an HTTP endpoint on ``metrics_port``
(``kvbm_observability.metrics``). Both stop in ``kvbm_shutdown``. Their settings are
keys of the core's ``KvbmSettings`` (``kv_events``, ``metrics``, ``metrics_port``,
``metrics_host``). Where they listen is said in one WARNING line when they start (so
it shows whatever the logging setup), and by ``kvbm status``.

It also registers the subcommands ``kvbm dashboard`` (the Grafana dashboard shipped
with the package) and ``kvbm status`` (where a configuration's endpoints are, and
whether they answer). This module imports only kvbm and the standard library; pyzmq,
msgpack and prometheus-client are imported only when a manager enables them
(``pip install 'kvbm[metrics]'``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from kvbm.errors import PluginError
from kvbm.hookspecs import hookimpl
from kvbm.plugins import CommandRegistry

if TYPE_CHECKING:
    from kvbm.manager import KvBlockManager

    from .kv_events import KvEventPublisher
    from .metrics import MetricsExporter

log = logging.getLogger("kvbm")

_NEEDS = ("zmq", "msgpack", "prometheus_client")
_MISSING = [m for m in _NEEDS if importlib.util.find_spec(m) is None]
#: What ``kvbm plugins`` says of this plugin, which registers no named entry.
KVBM_PLUGIN_NOTE = (
    "starts KV events and Prometheus metrics when the settings enable them"
    + (f" (missing {', '.join(_MISSING)}: pip install 'kvbm[metrics]')" if _MISSING else "")
)


@dataclass
class _Attached:
    publisher: KvEventPublisher | None = None
    exporter: MetricsExporter | None = None


_ATTACHED: weakref.WeakKeyDictionary[KvBlockManager, _Attached] = weakref.WeakKeyDictionary()


def _import(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PluginError(
            f"{what} needs {e.name or 'a missing package'}, which is not installed: "
            "pip install 'kvbm[metrics]'"
        ) from e


@hookimpl
def kvbm_register_commands(registry: CommandRegistry) -> None:
    """Add ``kvbm dashboard`` and ``kvbm status`` (standard library only)."""
    registry.add("dashboard", factory="kvbm_observability.cli:dashboard_command",
                 description="print the Grafana dashboard of the kvbm_ metrics, or write it "
                             "(--out FILE)")
    registry.add("status", factory="kvbm_observability.cli:status_command",
                 description="the chain, metrics and KV-event endpoints a configuration "
                             "gives, and whether they answer")


@hookimpl
def kvbm_chain_built(manager: KvBlockManager) -> None:
    """Start what the settings enable; a failure to start raises (the user asked for it)."""
    s = manager.settings
    att = _Attached()
    try:
        if s.kv_events.enabled:
            mod = _import("kvbm_observability.kv_events", "kv_events")
            att.publisher = mod.KvEventPublisher.attach(manager)
        if s.metrics:
            mod = _import("kvbm_observability.metrics", "metrics")
            att.exporter = mod.MetricsExporter(manager, s.metrics_host, s.metrics_port)
    except BaseException:
        _stop(manager, att)
        raise
    if att.publisher is not None or att.exporter is not None:
        _ATTACHED[manager] = att
        log.warning("%s", started_line(att))


def started_line(att: _Attached) -> str:
    """The one line that says where a manager's endpoints listen."""
    parts = []
    if att.exporter is not None:
        parts.append(f"Prometheus metrics on {att.exporter.url}")
    if att.publisher is not None:
        pub = att.publisher
        replay = f", replay on {pub.replay_endpoint}" if pub.replay_endpoint else ""
        parts.append(f"KV events on {pub.endpoint} (topic {pub.config.topic!r}{replay})")
    return "kvbm: " + "; ".join(parts)


@hookimpl
def kvbm_shutdown(manager: KvBlockManager) -> None:
    """Send ``AllBlocksCleared``, close the publisher and stop the endpoint."""
    att = _ATTACHED.pop(manager, None)
    if att is not None:
        _stop(manager, att)


def _stop(manager: KvBlockManager, att: _Attached) -> None:
    if att.publisher is not None:
        try:
            att.publisher.detach(manager)
        except Exception as e:
            log.warning("kvbm: closing the KV-event publisher failed (%s)", e)
        att.publisher = None
    if att.exporter is not None:
        try:
            att.exporter.close()
        except Exception as e:
            log.warning("kvbm: stopping the metrics endpoint failed (%s)", e)
        att.exporter = None


def kv_event_publisher(manager: KvBlockManager) -> KvEventPublisher | None:
    """The manager's KV-event publisher (its ``endpoint`` is where routers connect), if any."""
    att = _ATTACHED.get(manager)
    return att.publisher if att is not None else None


def metrics_exporter(manager: KvBlockManager) -> MetricsExporter | None:
    """The manager's metrics endpoint (``url``, ``port``), if any."""
    att = _ATTACHED.get(manager)
    return att.exporter if att is not None else None
