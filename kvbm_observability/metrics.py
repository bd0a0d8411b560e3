"""Prometheus metrics of one manager, read from ``manager.stats()`` at scrape time.

Nothing is counted per block here: the manager already keeps its counters (per tier
and per transfer path), and ``KvbmCollector`` turns one ``stats()`` snapshot into
metric families when Prometheus scrapes. Every ``MetricsExporter`` has its own
``CollectorRegistry`` (never the process-global one), so two managers in one process
export two independent endpoints. The endpoint serves Prometheus's text format
(``kvbm_observability._exposition``).

Names, all prefixed ``kvbm_``:

Dynamo KVBM's names, kept exactly: counters typed ``counter`` under their bare names
(no ``_total``, as Dynamo's Rust endpoint writes them, so dashboards written for
Dynamo work unchanged):

=========================  ===========================================================
``offload_blocks_d2h``     blocks offloaded into a CPU tier from the engine (or a GPU tier)
``offload_blocks_h2d``     blocks offloaded into a DISK tier from a CPU tier (host → disk)
``offload_blocks_d2d``     blocks offloaded into a DISK tier straight from the engine
``offload_blocks_d2o``     blocks offloaded into an OBJECT tier, from any tier above
``onboard_blocks_h2d``     blocks onboarded from a CPU tier to the engine
``onboard_blocks_d2d``     blocks onboarded from a DISK tier to the engine
``onboard_blocks_o2d``     blocks onboarded from an OBJECT tier to the engine
``offload_bytes_object``   bytes offloaded into OBJECT tiers
``onboard_bytes_object``   bytes onboarded from OBJECT tiers
``matched_tokens``         tokens of matched prefixes (matched blocks × page size)
``object_read_failures``   failed block reads of OBJECT tiers
``object_write_failures``  failed block writes of OBJECT tiers
=========================  ===========================================================

CPU, DISK, OBJECT and GPU are the media tier classes declare (``Tier.medium``), so a
third party's tier counts where its medium says, whatever its type is called.

Gauges ``host_cache_hit_rate``, ``disk_cache_hit_rate``, ``object_cache_hit_rate``:
hits / lookups of the tiers of medium CPU, DISK, OBJECT over a sliding window
(default 60 s, taken between scrapes; the first window counts from the start). A
lookup reaches a tier only when every tier above missed, as in Dynamo.

Counters with labels (``path`` is the manager's ``offload:<tier>`` /
``onboard:<tier>``; ``tier``/``type`` name the tier): ``transfer_blocks_total``,
``transfer_bytes_total``, ``transfer_seconds_total``, ``transfer_failures_total``,
``tier_hits_total``, ``tier_lookups_total``, ``evictions_total``,
``skipped_writes_total``, ``failed_writes_total``, ``failed_reads_total``,
``checksum_failures_total`` (a tier's ``stats()['checksum_failures']``),
``tier_stat_total`` (the other values of a tier's ``stats()`` that its class lists
in ``counter_stats``: counts that only grow, labelled ``stat``),
``events_dropped_batches_total``, ``blocks_not_saved_total``, ``leaked_pins_total``.
Gauges: ``tier_capacity_blocks``, ``tier_used_blocks``, ``tier_evictable_blocks``,
``tier_capacity_bytes``, ``tier_used_bytes``, ``tier_usage_ratio``, ``tier_hit_rate``,
``block_bytes``, ``pinned_blocks``, ``tier_stat`` (any other numeric value a tier
reports, labelled ``stat``), ``up``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from kvbm.errors import ConfigError

from ._chain import tier_media
from ._exposition import serve

if TYPE_CHECKING:
    from kvbm.manager import KvBlockManager

__all__ = [
    "DYNAMO_COUNTERS",
    "HIT_RATE_MEDIA",
    "PREFIX",
    "KvbmCollector",
    "MetricsExporter",
    "dynamo_bytes_name",
    "dynamo_path_name",
]

log = logging.getLogger("kvbm.metrics")

PREFIX = "kvbm_"

DYNAMO_COUNTERS: dict[str, str] = {
    "offload_blocks_d2h": "blocks offloaded device (engine) to host",
    "offload_blocks_h2d": "blocks offloaded host to disk",
    "offload_blocks_d2d": "blocks offloaded device (engine) to disk, bypassing host",
    "offload_blocks_d2o": "blocks offloaded to object storage",
    "onboard_blocks_h2d": "blocks onboarded host to device (engine)",
    "onboard_blocks_d2d": "blocks onboarded disk to device (engine)",
    "onboard_blocks_o2d": "blocks onboarded object storage to device (engine)",
    "offload_bytes_object": "bytes offloaded to object storage",
    "onboard_bytes_object": "bytes onboarded from object storage",
    "matched_tokens": "tokens of matched prefixes",
    "object_read_failures": "failed block reads of object storage tiers",
    "object_write_failures": "failed block writes of object storage tiers",
}
#: The medium of the tiers each Dynamo hit-rate gauge covers → the gauge's word.
HIT_RATE_MEDIA: dict[str, str] = {"CPU": "host", "DISK": "disk", "OBJECT": "object"}
_ONBOARD_NAMES = {
    "CPU": "onboard_blocks_h2d",
    "DISK": "onboard_blocks_d2d",
    "OBJECT": "onboard_blocks_o2d",
}
# Keys of a tier's stats() that have their own family (or are not numbers to export).
_KNOWN_TIER_KEYS = frozenset(
    {
        "type",
        "medium",
        "capacity_blocks",
        "used_blocks",
        "evictable_blocks",
        "hits",
        "lookups",
        "evictions",
        "skipped_writes",
        "failed_writes",
        "failed_reads",
        "checksum_failures",
    }
)


def dynamo_path_name(path: str, media: dict[str, str]) -> str | None:
    """Dynamo's counter name for a transfer path of this chain, or None if it has none.

    The source of ``offload:<tier>`` is the tier above it in the chain (the engine,
    i.e. the device, for the first tier); the destination of ``onboard:<tier>`` is
    the engine. ``media`` maps each tier's name to its declared medium, in chain
    order (``{"host": "CPU", "disk": "DISK"}``).
    """
    direction, _, name = path.partition(":")
    if name not in media:
        return None
    medium = media[name]
    if direction == "onboard":
        return _ONBOARD_NAMES.get(medium)
    if direction != "offload":
        return None
    order = list(media)
    i = order.index(name)
    src = "engine" if i == 0 else media[order[i - 1]]
    from_device = src in ("engine", "GPU")
    if medium == "CPU":
        return "offload_blocks_d2h" if from_device else None
    if medium == "DISK":
        if from_device:
            return "offload_blocks_d2d"
        return "offload_blocks_h2d" if src == "CPU" else None
    if medium == "OBJECT":
        return "offload_blocks_d2o"
    return None


def dynamo_bytes_name(path: str, media: dict[str, str]) -> str | None:
    """Dynamo's bytes counter for a transfer path (into or out of an OBJECT tier), or None."""
    direction, _, name = path.partition(":")
    if media.get(name) != "OBJECT" or direction not in ("offload", "onboard"):
        return None
    return f"{direction}_bytes_object"


class KvbmCollector(Collector):
    """Builds the ``kvbm_`` metric families from one ``manager.stats()`` per scrape."""

    def __init__(self, manager: KvBlockManager, hit_rate_window_s: float = 60.0) -> None:
        self.manager = manager
        self.window = hit_rate_window_s
        # (monotonic time, {tier: (hits, lookups)}) at past scrapes, for the window.
        self._history: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()
        self._lock = threading.Lock()

    def _windowed(self, now: float, cur: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """Hits and lookups per tier within the window (since start for the first one)."""
        with self._lock:
            hist = self._history
            # Keep the newest snapshot at or before the window's start as its base.
            while len(hist) >= 2 and hist[1][0] <= now - self.window:
                hist.popleft()
            base = hist[0][1] if hist and hist[0][0] <= now - self.window else {}
            hist.append((now, cur))
        return {
            t: (h - base.get(t, (0, 0))[0], lk - base.get(t, (0, 0))[1])
            for t, (h, lk) in cur.items()
        }

    def collect(self) -> Iterator[Metric]:
        """Metric families of the manager's current counters."""
        up = GaugeMetricFamily(PREFIX + "up", "1 when the manager's stats could be read")
        try:
            st = self.manager.stats()
        except Exception as e:  # a broken tier must not take the endpoint down
            log.warning("kvbm metrics: stats() failed (%s)", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        tiers: dict[str, dict[str, Any]] = st.get("tiers", {})
        paths: dict[str, dict[str, Any]] = st.get("paths", {})
        bb = int(getattr(self.manager, "block_bytes", 0))
        page = int(getattr(self.manager, "page_size", 0))
        yield from self._dynamo(tiers, paths, page, self._media(tiers))
        yield from self._paths(tiers, paths)
        yield from self._tiers(tiers, bb, self._counter_stats())
        c = CounterMetricFamily(
            PREFIX + "events_dropped_batches",
            "event batches dropped because subscribers fell behind",
        )
        c.add_metric([], st.get("events_dropped", 0))
        yield c
        c = CounterMetricFamily(
            PREFIX + "blocks_not_saved",
            "blocks offered for saving that no tier of the chain had a free slot for",
        )
        c.add_metric([], st.get("not_saved_blocks", 0))
        yield c
        c = CounterMetricFamily(
            PREFIX + "leaked_pins",
            "pins of matches dropped without release(), given back when garbage-collected",
        )
        c.add_metric([], st.get("leaked_pins", 0))
        yield c
        g = GaugeMetricFamily(PREFIX + "pinned_blocks", "pins held now over all tiers")
        g.add_metric([], st.get("pinned_blocks", 0))
        yield g
        g = GaugeMetricFamily(PREFIX + "block_bytes", "bytes of one KV block")
        g.add_metric([], bb)
        yield g

    def _counter_stats(self) -> dict[str, frozenset[str]]:
        """Tier name → the ``stats()`` keys its class declares as counts that only grow."""
        return {
            rt.name: frozenset(getattr(type(rt.tier), "counter_stats", ()))
            for rt in getattr(self.manager, "chain", ())
        }

    def _media(self, tiers: dict[str, dict[str, Any]]) -> dict[str, str]:
        """Each tier's declared medium, in the order of ``tiers`` (the chain's)."""
        declared = tier_media(self.manager)
        return {n: str(t.get("medium") or declared.get(n, "STORAGE")) for n, t in tiers.items()}

    def _dynamo(
        self,
        tiers: dict[str, dict[str, Any]],
        paths: dict[str, dict[str, Any]],
        page: int,
        media: dict[str, str],
    ) -> Iterator[Metric]:
        values = dict.fromkeys(DYNAMO_COUNTERS, 0.0)
        for path, p in paths.items():
            name = dynamo_path_name(path, media)
            if name is not None:
                values[name] += p.get("blocks", 0)
            name = dynamo_bytes_name(path, media)
            if name is not None:
                values[name] += p.get("bytes", 0)
        for n, t in tiers.items():
            values["matched_tokens"] += t.get("hits", 0) * page
            if media[n] == "OBJECT":
                values["object_read_failures"] += t.get("failed_reads", 0)
                values["object_write_failures"] += t.get("failed_writes", 0)
        for name, doc in DYNAMO_COUNTERS.items():
            # Typed counter under the bare name; the exposition keeps the name as is.
            m = Metric(PREFIX + name, doc + " (Dynamo KVBM name)", "counter")
            m.add_sample(PREFIX + name, {}, values[name])
            yield m
        now = time.monotonic()
        win = self._windowed(
            now, {n: (int(t.get("hits", 0)), int(t.get("lookups", 0))) for n, t in tiers.items()}
        )
        for medium, label in HIT_RATE_MEDIA.items():
            hits = sum(win[n][0] for n in tiers if media[n] == medium)
            looks = sum(win[n][1] for n in tiers if media[n] == medium)
            g = GaugeMetricFamily(
                PREFIX + f"{label}_cache_hit_rate",
                f"{label} tier hits / lookups over the last {self.window:g} s",
            )
            g.add_metric([], hits / looks if looks else 0.0)
            yield g
        g = GaugeMetricFamily(
            PREFIX + "tier_hit_rate",
            f"hits / lookups per tier over the last {self.window:g} s",
            labels=["tier", "type"],
        )
        for n, t in tiers.items():
            h, lk = win[n]
            g.add_metric([n, str(t.get("type"))], h / lk if lk else 0.0)
        yield g

    def _paths(
        self, tiers: dict[str, dict[str, Any]], paths: dict[str, dict[str, Any]]
    ) -> Iterator[Metric]:
        labels = ["path", "direction", "tier", "type"]
        fams = {
            "blocks": CounterMetricFamily(
                PREFIX + "transfer_blocks", "blocks moved per path", labels=labels
            ),
            "bytes": CounterMetricFamily(
                PREFIX + "transfer_bytes", "bytes moved per path", labels=labels
            ),
            "seconds": CounterMetricFamily(
                PREFIX + "transfer_seconds", "seconds spent moving blocks per path", labels=labels
            ),
            "failures": CounterMetricFamily(
                PREFIX + "transfer_failures", "blocks that failed to move per path", labels=labels
            ),
        }
        for path, p in sorted(paths.items()):
            direction, _, tier = path.partition(":")
            lv = [path, direction, tier, str(tiers.get(tier, {}).get("type", ""))]
            for key, fam in fams.items():
                fam.add_metric(lv, p.get(key, 0))
        yield from fams.values()

    def _tiers(
        self, tiers: dict[str, dict[str, Any]], bb: int, counting: dict[str, frozenset[str]]
    ) -> Iterator[Metric]:
        labels = ["tier", "type"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=labels)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=labels)

        cap, used, evictable = (
            gauge("tier_capacity_blocks", "block slots of the tier"),
            gauge("tier_used_blocks", "block slots in use"),
            gauge("tier_evictable_blocks", "blocks that may be evicted now"),
        )
        cap_b, used_b, ratio = (
            gauge("tier_capacity_bytes", "bytes of the tier's slots"),
            gauge("tier_used_bytes", "bytes of the slots in use"),
            gauge("tier_usage_ratio", "used / capacity slots"),
        )
        counters = {
            "hits": counter("tier_hits", "lookups that found the block in this tier"),
            "lookups": counter("tier_lookups", "lookups that reached this tier"),
            "evictions": counter("evictions", "blocks evicted from the tier"),
            "skipped_writes": counter("skipped_writes", "blocks not written: no free slot"),
            "failed_writes": counter("failed_writes", "blocks whose write failed"),
            "failed_reads": counter("failed_reads", "blocks whose read failed (or checksum)"),
            "checksum_failures": counter(
                "checksum_failures",
                "blocks read back with a wrong checksum, header or length (served as misses)",
            ),
        }
        extra = GaugeMetricFamily(
            PREFIX + "tier_stat",
            "other numeric values a tier reports",
            labels=["tier", "type", "stat"],
        )
        # Counts that only grow (a remote tier's bytes read, leases served): counters,
        # so that rate() over them is right across restarts.
        extra_counts = CounterMetricFamily(
            PREFIX + "tier_stat",
            "other counts a tier reports that only grow (its class's counter_stats)",
            labels=["tier", "type", "stat"],
        )
        for name, t in tiers.items():
            lv = [name, str(t.get("type"))]
            c, u = t.get("capacity_blocks", 0), t.get("used_blocks", 0)
            cap.add_metric(lv, c)
            used.add_metric(lv, u)
            evictable.add_metric(lv, t.get("evictable_blocks", 0))
            cap_b.add_metric(lv, c * bb)
            used_b.add_metric(lv, u * bb)
            ratio.add_metric(lv, u / c if c else 0.0)
            for key, fam in counters.items():
                fam.add_metric(lv, t.get(key, 0))
            for key, v in t.items():
                if key in _KNOWN_TIER_KEYS or not isinstance(v, (int, float)):
                    continue
                into = extra_counts if key in counting.get(name, ()) else extra
                into.add_metric([*lv, key], float(v))
        yield from (cap, used, evictable, cap_b, used_b, ratio)
        yield from counters.values()
        yield extra
        yield extra_counts


class MetricsExporter:
    """An HTTP endpoint serving one manager's metrics at ``/metrics``.

    ``port`` 0 picks a free port; the bound one is ``self.port`` and ``self.url``.
    """

    def __init__(
        self,
        manager: KvBlockManager,
        host: str = "127.0.0.1",
        port: int = 6880,
        hit_rate_window_s: float = 60.0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = KvbmCollector(manager, hit_rate_window_s)
        self.registry.register(self.collector)
        try:
            self._server, self._thread = serve(self.registry, host, port)
        except OSError as e:
            raise ConfigError(
                f"metrics endpoint: cannot listen on {host}:{port} ({e.strerror or e}); set "
                "metrics_port (DYN_KVBM_METRICS_PORT) to a free port, or 0 to pick one per instance"
            ) from None
        self.host = host
        self.port: int = self._server.server_port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/metrics"
        log.info("kvbm: Prometheus metrics on %s", self.url)

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
