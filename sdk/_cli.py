"""The ``kvfuse`` command line.

Exit codes: 0 success; 1 failure; 4 usage error; 5 nothing applicable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from kvfuse._device import OP_NAMES
from kvfuse._errors import KvfuseError
from kvfuse._registry import Registry, registry
from kvfuse._version import __version__

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOTHING = 0, 1, 4, 5

Subcommand = Callable[[argparse.ArgumentParser, Any], None]
"""Registers one subcommand: ``(parser, subparsers action) -> None``; sets ``func`` on it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def device_rows(reg: Registry) -> dict[str, Any]:
    """The data of ``kvfuse devices --json``."""
    rows = []
    for dev in reg.devices():
        caps = reg.capabilities(dev.name, fresh=True)
        avail = reg.probe(dev.name)
        rows.append(
            {
                "name": dev.name,
                "vendor": dev.vendor,
                "available": avail.available,
                "reason": avail.reason,
                "mode": avail.mode,
                "api_version": dev.api_version,
                "plugin": reg.origin(dev.name),
                "torch_device": dev.torch_device_type,
                "capabilities": caps.model_dump(mode="json") if caps is not None else {"ops": {}},
            }
        )
    broken = [{"name": b.name, "reason": b.reason} for b in reg.broken]
    found = sorted(reg.transports().items())
    transports = [{"name": name, "class": f"{cls.__module__}.{cls.__qualname__}"} for name, cls in found]
    return {"devices": rows, "transports": transports, "broken_plugins": broken}


def _devices(args: argparse.Namespace) -> int:
    data = device_rows(registry())
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"kvfuse {__version__} devices")
    for col in ("device", "vendor", "available", "mode / reason", "api", "plugin", "ops"):
        table.add_column(col)
    for row in data["devices"]:
        ops = f"{len(row['capabilities']['ops'])}/{len(OP_NAMES)}"
        why = " — ".join(x for x in (row["mode"], row["reason"]) if x)
        table.add_row(
            row["name"], row["vendor"], "yes" if row["available"] else "no", why, row["api_version"], row["plugin"], ops
        )
    console.print(table)
    console.print("page transports: " + (", ".join(t["name"] for t in data["transports"]) or "none"))
    if data["broken_plugins"]:
        broken = Table(title="broken plugins", title_style="bold red")
        broken.add_column("plugin")
        broken.add_column("reason")
        for b in data["broken_plugins"]:
            broken.add_row(b["name"], b["reason"])
        console.print(broken)
    return EXIT_OK


def build_parser(extra: Sequence[Subcommand] = ()) -> argparse.ArgumentParser:
    parser = _Parser(prog="kvfuse", description="kvfuse: fuse stored KV with live tokens, on any chip.")
    parser.add_argument("--version", action="version", version=f"kvfuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("devices", help="list registered devices, page transports and broken plugins")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_devices)
    for register in extra:
        register(parser, sub)
    return parser


def _subcommands() -> list[Subcommand]:
    """Subcommands provided by other kvfuse packages (conformance, bench), if installed."""
    found: list[Subcommand] = []
    for module in ("kvfuse._bench", "kvfuse.conformance._cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        found.append(mod.register)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(_subcommands())
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KvfuseError as exc:
        print(f"kvfuse: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:  # e.g. `kvfuse conformance list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # silence the flush at exit
        return EXIT_OK
    return code


if __name__ == "__main__":
    raise SystemExit(main())
