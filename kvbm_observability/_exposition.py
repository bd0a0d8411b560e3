"""Prometheus's text format (0.0.4) of a registry, served over HTTP at ``/metrics``.

Why not ``prometheus_client``'s own server: Dynamo KVBM's counters are named without
``_total`` (``kvbm_offload_blocks_d2h``, as the Rust ``prometheus`` crate writes an
``IntCounter``), and dashboards written for Dynamo query those bare names.
``prometheus_client`` either appends ``_total`` to a counter or, for a sample named
without it, writes ``# TYPE NAME_total counter`` above a sample called ``NAME``,
which leaves the sample untyped. Here a counter family whose samples carry its bare
name is typed under that name, as Dynamo's endpoint does; every other family is
written as ``prometheus_client`` writes it. Only the text format is served (what
Dynamo's endpoint serves too); Prometheus asks for it among others and accepts it.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.registry import CollectorRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _value(v: float) -> str:
    """A sample value as Go's Prometheus client writes it (``+Inf``, ``NaN``, ``1.0``)."""
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def exposition(registry: CollectorRegistry) -> bytes:
    """Every family of ``registry`` in the text format, typed as described above."""
    out: list[str] = []
    for fam in registry.collect():
        name, typ = fam.name, fam.type
        if typ == "counter" and (not fam.samples or any(s.name != name for s in fam.samples)):
            name += "_total"
        elif typ == "unknown":
            typ = "untyped"
        out.append(f"# HELP {name} {_help(fam.documentation)}")
        out.append(f"# TYPE {name} {typ}")
        for s in fam.samples:
            labels = ",".join(f'{k}="{_label(str(v))}"' for k, v in s.labels.items())
            shown = f"{s.name}{{{labels}}}" if labels else s.name
            out.append(f"{shown} {_value(s.value)}")
    return ("\n".join(out) + "\n").encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "kvbm serves /metrics")
            return
        try:
            body = exposition(self.server.registry)
        except Exception as e:  # one broken scrape must not kill the server
            self.send_error(500, f"kvbm metrics: {type(e).__name__}: {e}")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Scrapes are not logged (one line per scrape would flood the engine's log)."""


def serve(registry: CollectorRegistry, host: str, port: int) -> tuple[_Server, threading.Thread]:
    """Serve ``registry`` on ``host:port`` (0: a free port) from a daemon thread.

    Raises ``OSError`` when the address cannot be bound.
    """
    cls = _V6Server if ":" in host else _Server
    server = cls((host, port), _Handler)
    server.registry = registry
    thread = threading.Thread(target=server.serve_forever, name="kvbm-metrics", daemon=True)
    thread.start()
    return server, thread
