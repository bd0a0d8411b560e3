"""The ``kvbm`` command: ``plugins``, ``config check``, ``bench`` and plugin subcommands.

Subcommands beyond the core's live in the modules of ``SUBCOMMAND_MODULES``; each has
``register(subparsers)`` that adds its parser and sets ``func`` to a function taking
the parsed ``argparse.Namespace`` and returning an exit code. A module whose imports
are missing is skipped, so the command always starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import KvbmError

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "kvbm.bench.cli",
    "kvbm_policies.simulate",
)


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import build_plugins

    plugins = build_plugins()
    rows: list[dict[str, Any]] = []
    for info in plugins.plugins:
        entries = plugins.entries_of(info)
        if not entries:
            rows.append({"name": info.name, "kind": "-", "plugin": info.name,
                         "distribution": info.distribution, "version": info.version,
                         "status": info.note or "registers nothing"})
        for e in entries:
            rows.append({"name": e.name, "kind": e.kind, "plugin": info.name,
                         "distribution": info.distribution, "version": info.version,
                         "status": "available" if e.available else f"unavailable: {e.install_hint}"})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["name", "kind", "plugin", "distribution", "version", "status"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .manager import resolve_chain
    from .plugins import build_plugins
    from .sizes import format_size

    settings = load_settings(args.file)
    plugins = build_plugins()
    links = resolve_chain(settings, plugins)
    layout = settings.layout()
    bb = layout.bytes_per_block
    m = settings.model
    print(f"model {m.name}: {m.num_layers} layers x {m.outer_dim} x page {settings.page_size} x "
          f"{m.num_kv_heads} heads x {m.head_dim} ({m.dtype}); block {format_size(bb)} "
          f"({bb} bytes); layout digest {layout.digest}")
    for i, link in enumerate(links):
        shown = link.config.model_dump(exclude={"name", "type"}, exclude_none=True)
        shown = {k: v for k, v in shown.items() if v not in ({}, [])}
        print(f"tier {i} {link.name!r} ({link.config.type}): {link.num_blocks} blocks, "
              f"{format_size(link.num_blocks * bb)}; eviction {link.config.policy}; "
              f"admission {type(link.admission).__name__}")
        for k, v in shown.items():
            if "secret" in k or "password" in k or ("key" in k.lower() and "access" in k.lower()):
                v = "***"
            print(f"    {k}: {v}")
    print("ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available subcommand."""
    p = argparse.ArgumentParser(prog="kvbm", description="KV-cache block manager for LLM inference")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("plugins", help="list installed plugins and what they register")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=_cmd_plugins)
    sc = sub.add_parser("config", help="configuration tools")
    csub = sc.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="print the resolved chain of a YAML file, or its errors")
    cc.add_argument("file", help="YAML config file")
    cc.set_defaults(func=_cmd_config_check)
    for mod_name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        mod.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvbm`` script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KvbmError as e:
        print(f"kvbm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`kvbm plugins | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
