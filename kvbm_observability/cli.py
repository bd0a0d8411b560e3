"""``kvbm dashboard`` and ``kvbm status``: the shipped dashboard, and where the endpoints are.

``kvbm dashboard`` prints the Grafana dashboard of the ``kvbm_`` metrics (package data:
``kvbm_observability/dashboards/kvbm-grafana.json``), or writes it with ``--out FILE``.

``kvbm status [FILE]`` reads a configuration as ``kvbm config check`` does (the file,
else ``KVBM_CONFIG``, else the environment and defaults), prints the chain, the
metrics URL and the KV-event endpoint it gives, and asks each enabled endpoint
whether it answers: the metrics URL must serve ``kvbm_up``; the event endpoint must
greet as a ZMQ socket (ZMTP's 10-byte signature; nothing is subscribed). Exit status
0 when every enabled endpoint answers, 1 when one does not. Standard library only.
"""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvbm.config import KvbmSettings

__all__ = ["dashboard_command", "dashboard_json", "status_command", "status_lines"]

#: ZMTP 3's greeting starts with this signature (0xFF, 8 padding bytes, 0x7F); a ZMQ
#: socket sends it as soon as a peer connects.
_ZMTP_SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"


def dashboard_json() -> str:
    """The Grafana dashboard shipped with the package, as JSON text."""
    res = files("kvbm_observability").joinpath("dashboards", "kvbm-grafana.json")
    return res.read_text(encoding="utf-8")


def dashboard_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``kvbm dashboard [--out FILE]``."""
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="write the dashboard to FILE instead of printing it")

    def run(args: argparse.Namespace) -> int:
        text = dashboard_json()
        if args.out is None:
            sys.stdout.write(text)
            return 0
        out = Path(args.out)
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as e:
            from kvbm.errors import KvbmError

            raise KvbmError(f"dashboard: cannot write --out {str(out)!r} ({e.strerror or e}); "
                            "give a path in a writable folder") from None
        print(f"wrote {out} (import it in Grafana: Dashboards > New > Import; pick the "
              "Prometheus data source that scrapes kvbm)")
        return 0

    return run


def _probe_host(host: str) -> str:
    """Where to connect to reach a listener bound on ``host`` (a wildcard: loopback)."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def metrics_url(settings: KvbmSettings) -> str | None:
    """The URL the metrics endpoint serves, None when its port is picked at start (0)."""
    if not settings.metrics_port:
        return None
    host = settings.metrics_host
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{settings.metrics_port}/metrics"


def events_endpoint(settings: KvbmSettings) -> str | None:
    """The address the KV-event publisher binds, None when its port is picked at start (0)."""
    kv = settings.kv_events
    if kv.endpoint.startswith(("ipc://", "inproc://")):
        return f"{kv.endpoint}_dp{kv.dp_rank}" if kv.dp_rank else kv.endpoint
    if not kv.port:
        return None
    return f"{kv.endpoint}:{kv.port + kv.dp_rank}"


def probe_metrics(url: str, timeout: float) -> tuple[bool, str]:
    """(answers, what was seen) for a metrics URL."""
    probe = url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")
    try:
        with urllib.request.urlopen(probe, timeout=timeout) as r:
            text = r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code} from it: another program holds the port"
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        return False, f"no answer ({reason})"
    up = next((ln for ln in text.splitlines() if ln.startswith("kvbm_up ")), None)
    if up is None:
        return False, "it answers but serves no kvbm_up: another program holds the port"
    return True, f"answers ({up.strip()})"


def probe_events(endpoint: str, timeout: float) -> tuple[bool, str]:
    """(answers, what was seen) for a ``tcp://`` or ``ipc://`` ZMQ endpoint."""
    if endpoint.startswith("inproc://"):
        return False, "inproc:// lives inside its process; nothing outside can ask it"
    try:
        if endpoint.startswith("ipc://"):
            sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            where: object = endpoint[len("ipc://"):]
        else:
            host, _, port = endpoint[len("tcp://"):].rpartition(":")
            host = _probe_host(host)
            sk = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            where = (host, int(port))
        with sk:
            sk.settimeout(timeout)
            sk.connect(where)  # type: ignore[arg-type]
            got = b""
            try:
                sk.sendall(_ZMTP_SIGNATURE)
                while len(got) < len(_ZMTP_SIGNATURE):
                    chunk = sk.recv(len(_ZMTP_SIGNATURE) - len(got))
                    if not chunk:
                        break
                    got += chunk
            except OSError:
                pass  # connected, but no greeting: said below
    except (OSError, ValueError) as e:
        return False, f"no answer ({e})"
    if got[:1] == b"\xff" and got[9:10] == b"\x7f":
        return True, "answers (a ZMQ socket)"
    return False, ("it accepts connections but not as a ZMQ socket: another program holds "
                   "the port")


def status_lines(settings: KvbmSettings, chain: list[str], timeout: float) -> tuple[list[str], bool]:
    """The lines ``kvbm status`` prints, and whether every enabled endpoint answered."""
    lines = ["chain: " + " -> ".join(chain)]
    ok = True
    url = metrics_url(settings)
    if not settings.metrics:
        where = url or "a free port picked at start"
        lines.append(f"metrics: off (metrics: true or DYN_KVBM_METRICS=true serves {where})")
    elif url is None:
        lines.append("metrics: on, port picked at start (metrics_port 0): see the manager's "
                     "'kvbm: Prometheus metrics on ...' line")
    else:
        answers, seen = probe_metrics(url, timeout)
        ok &= answers
        lines.append(f"metrics: on, {url}: {seen}")
    kv = settings.kv_events
    ep = events_endpoint(settings)
    detail = f"topic {kv.topic!r}, hashes {kv.hash_format}"
    if kv.replay:
        rep = (f"{kv.replay_endpoint or kv.endpoint}:{kv.replay_port + kv.dp_rank}"
               if kv.replay_port else "port picked at start")
        detail += f", replay {rep}"
    if not kv.enabled:
        lines.append(f"kv events: off (kv_events: {{enabled: true}} publishes on "
                     f"{ep or 'a free port picked at start'})")
    elif ep is None:
        lines.append(f"kv events: on, port picked at start (kv_events.port 0; {detail}): see "
                     "the manager's 'kvbm: ... KV events on ...' line")
    else:
        answers, seen = probe_events(ep, timeout)
        ok &= answers
        lines.append(f"kv events: on, {ep} ({detail}): {seen}")
    return lines, ok


def status_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``kvbm status [FILE] [--timeout S]``."""
    parser.add_argument("file", nargs="?", default=None,
                        help="YAML config file (default: KVBM_CONFIG, else the environment and "
                             "defaults alone), as for `kvbm config check`")
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="seconds to wait for each endpoint's answer (default 2)")

    def run(args: argparse.Namespace) -> int:
        from kvbm.chain import resolve_chain
        from kvbm.config import load_settings
        from kvbm.plugins import build_plugins
        from kvbm.sizes import format_size

        plugins = build_plugins()
        settings = load_settings(args.file, tier_types=plugins.tiers)  # None: KVBM_CONFIG, env
        links = resolve_chain(settings, plugins)
        bb = settings.layout().bytes_per_block
        chain = [f"{ln.name} ({ln.config.type}, {format_size(ln.num_blocks * bb)})"
                 for ln in links]
        lines, ok = status_lines(settings, chain, args.timeout)
        print("\n".join(lines))
        return 0 if ok else 1

    return run
