"""The ``kvbm`` command: ``plugins``, ``plugin new``, ``config check``, ``--version``, and
the plugins' subcommands.

Plugins add subcommands through ``kvbm_register_commands`` (``kvbm bench`` and ``kvbm
simulate`` come from the bench and policy plugins). A subcommand's module is imported
only when it runs, so ``kvbm plugins`` imports none of them, and one whose packages are
missing is listed with the pip command that installs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import KvbmError, PluginError
from .plugins import Entry, Plugins, build_plugins


def _cmd_plugins(args: argparse.Namespace) -> int:
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


def _shown_value(key: str, value: Any) -> str:
    """A config value as ``config check`` prints it: secrets masked, whatever their type."""
    from .redact import is_secret_key

    if is_secret_key(key) and value is not None:
        return "***"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown_value(str(k), v)}" for k, v in value.items()) + "}"
    return str(value)


def _cmd_plugin_new(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .scaffold import names_for, new_plugin

    names = names_for(args.name)
    taken = build_plugins().tiers
    if args.name in taken:
        owner = taken.get(args.name).plugin
        raise KvbmError(f"plugin name {args.name!r}: tier type {args.name!r} exists already "
                        f"(plugin {owner.name!r} of distribution {owner.distribution!r}); "
                        "choose another name")
    written = new_plugin(args.name, Path(args.dir) if args.dir else None)
    root = written[0].parent
    print(f"wrote {names['__DIST__']} ({len(written)} files) in {root}:")
    for path in written:
        print(f"    {path.relative_to(root)}")
    print(f"next: cd {root} && pip install -e '.[test]' && kvbm plugins && pytest tests")
    return 0


def _version() -> str:
    from .plugins import _dist_version

    return f"kvbm {_dist_version('kvbm')}"


def _cmd_config_check(args: argparse.Namespace) -> int:
    from .chain import resolve_chain
    from .config import ProbeContext, load_settings
    from .sizes import format_size

    plugins = build_plugins()
    settings = load_settings(args.file, tier_types=plugins.tiers)
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
            print(f"    {k}: {_shown_value(k, v)}")
    if args.probe:
        failed = 0
        for link in links:
            ctx = ProbeContext(link.name, link.num_blocks, bb, timeout_s=args.timeout)
            try:
                results = link.config.probe(ctx)
            except Exception as e:  # a probe that breaks is a failed probe, one line
                print(f"probe FAILED: tier {link.name!r}: the probe raised {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}")
                failed += 1
                continue
            if not results:
                print(f"probe ok: tier {link.name!r}: nothing to touch on this machine")
            for r in results:
                print(f"probe {'ok' if r.ok else 'FAILED'}: {r.line}")
                failed += not r.ok
        if failed:
            raise KvbmError(f"{failed} probe(s) failed; see the lines above")
    print("ok")
    return 0


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option.

    ``kvbm``'s own options take no value, so that word is the subcommand's name.
    """
    return next((a for a in argv if not a.startswith("-")), None)


def _plugin_command(entry: Entry, parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Import ``entry``'s factory and let it fill ``parser``; the function that runs it."""
    factory = entry.load()
    run = factory(parser)
    if not callable(run):
        raise PluginError(
            f"command {entry.name!r}: factory {entry.factory!r} of plugin {entry.plugin.name!r} "
            f"returned {type(run).__name__}, not the function that runs the command"
        )
    return run  # type: ignore[no-any-return]


def build_parser(argv: Sequence[str] = (), plugins: Plugins | None = None) -> argparse.ArgumentParser:
    """The ``kvbm`` argument parser, with every registered subcommand.

    Only the subcommand ``argv`` names has its plugin module imported and its arguments
    added; the others are listed by name and description. Raises ``PluginError`` when
    that subcommand's module cannot be imported (with the pip command that fixes it).
    """
    plugins = plugins if plugins is not None else build_plugins()
    wanted = _command_of(argv)
    p = argparse.ArgumentParser(prog="kvbm", description="KV-cache block manager for LLM inference")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.add_argument("--version", action="version", version=_version(),
                   help="print kvbm's version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("plugins", help="list installed plugins and what they register")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=_cmd_plugins)
    pp = sub.add_parser("plugin", help="plugin authoring tools")
    psub = pp.add_subparsers(dest="plugin_command", required=True)
    pn = psub.add_parser("new", help="write a template tier plugin distribution (kvbm-NAME)")
    pn.add_argument("name", help="the tier type's name, e.g. mytier (package kvbm_mytier)")
    pn.add_argument("--dir", default=None,
                    help="folder to write it in, new or empty (default: ./kvbm-NAME)")
    pn.set_defaults(func=_cmd_plugin_new)
    sc = sub.add_parser("config", help="configuration tools")
    csub = sc.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="print the resolved chain of a YAML file, or its errors")
    cc.add_argument("file", nargs="?", default=None,
                    help="YAML config file (default: KVBM_CONFIG, else the environment and "
                         "defaults alone)")
    cc.add_argument("--probe", action="store_true",
                    help="also touch what the chain needs on this machine: a file made and "
                         "removed in each disk path (O_DIRECT), a HEAD of each bucket with its "
                         "credentials, free memory and space; one line each")
    cc.add_argument("--timeout", type=float, default=5.0,
                    help="seconds a network probe may wait (default 5)")
    cc.set_defaults(func=_cmd_config_check)
    for name in plugins.commands.names():
        entry = plugins.commands.get(name)
        shown = entry.description if entry.available else (
            f"{entry.description} (unavailable: {entry.install_hint})")
        cp = sub.add_parser(name, help=shown, description=entry.description or None)
        if name == wanted:
            cp.set_defaults(func=_plugin_command(entry, cp))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvbm`` script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if _command_of(argv) is None and "--version" in argv:
        # Before the plugins load: a broken plugin must not hide the version to report.
        print(_version())
        return 0
    try:
        parser = build_parser(argv)
    except KvbmError as e:
        print(f"kvbm: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KvbmError as e:
        print(f"kvbm: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`kvbm plugins | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        # A bug, not a config problem: still one line (tracebacks scare and hide the
        # line that matters); -v shows the traceback for a report.
        if args.verbose:
            logging.getLogger("kvbm").exception("kvbm: internal error")
        print(f"kvbm: internal error: {type(e).__name__}: {_one_line(e)} (run with -v for "
              "the traceback and please report it)", file=sys.stderr)
        return 3


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
