"""``kvfuse conformance list | run | repro``.

Exit codes of ``run``: 0 conformant; 1 any failure, crash or timeout; 4 usage error;
5 nothing applicable.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

import kvfuse
from kvfuse._cli import EXIT_OK, EXIT_USAGE
from kvfuse.conformance._cases import PROFILES, cases, get_case
from kvfuse.conformance._runner import Result, load_waivers, repro_snippet, run_suite, write


def register(parser: argparse.ArgumentParser, sub: Any) -> None:
    conf = sub.add_parser("conformance", help="run the conformance suite on devices")
    csub = conf.add_subparsers(dest="conformance_command", required=True, parser_class=type(parser))
    p = csub.add_parser("list", help="list the cases of a profile")
    p.add_argument("--profile", choices=PROFILES, default="standard")
    p.add_argument("-k", dest="select", metavar="SUBSTR", help="only cases whose id contains SUBSTR")
    p.set_defaults(func=_list)
    p = csub.add_parser("run", help="run the suite")
    p.add_argument(
        "--device",
        action="append",
        dest="devices",
        metavar="NAME",
        help="device to test (repeatable; default: every available device)",
    )
    p.add_argument("--profile", choices=PROFILES, default="standard")
    p.add_argument("-k", dest="select", metavar="SUBSTR", help="only cases whose id contains SUBSTR")
    p.add_argument("--json", metavar="PATH", help="write the JSON report here")
    p.add_argument("--junitxml", metavar="PATH", help="write a JUnit XML report here")
    p.add_argument("--waivers", metavar="FILE", help="TOML or YAML waiver file")
    p.add_argument("--isolate", action="store_true", help="run cases in a worker process (crash/hang safe)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per-case timeout with --isolate")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="suite seed for the case inputs")
    p.add_argument(
        "--torch-device",
        metavar="DEV",
        help="torch device for the inputs, e.g. cuda:1 (default: each device's own type, current index)",
    )
    p.set_defaults(func=_run)
    p = csub.add_parser("repro", help="print a standalone Python snippet that re-runs one case")
    p.add_argument("case_id", metavar="ID")
    p.add_argument("--device", required=True, metavar="NAME")
    p.add_argument("--seed", type=int, default=0, metavar="N")
    p.set_defaults(func=_repro)


def _usage(message: str) -> int:
    print(f"kvfuse conformance: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _list(args: argparse.Namespace) -> int:
    for case in cases(args.profile, args.select):
        print(f"{case.id}\t{case.op}\t{case.tolerance}")
    return EXIT_OK


def _repro(args: argparse.Namespace) -> int:
    try:
        get_case(args.case_id)
    except KeyError:
        return _usage(f"no case with id {args.case_id!r} (see `kvfuse conformance list --profile full`)")
    print(repro_snippet(args.case_id, args.device, args.seed), end="")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    reg = kvfuse.registry()
    names = args.devices or [d.name for d in reg.devices() if reg.probe(d.name).available]
    for name in names:
        try:
            reg.get(name)
        except kvfuse.KvfuseError as exc:
            return _usage(str(exc))
    waivers = []
    if args.waivers:
        try:
            waivers = load_waivers(args.waivers)
        except (OSError, ValueError) as exc:
            return _usage(f"--waivers: {exc}")
    selected = cases(args.profile, args.select)
    progress, on_result, done = _reporter(len(selected) * len(names))
    with progress or _null():
        report = run_suite(
            names,
            selected,
            profile=args.profile,
            seed=args.seed,
            isolate=args.isolate,
            timeout=args.timeout,
            waivers=waivers,
            on_result=on_result,
            torch_device=args.torch_device,
        )
    done()
    for w in waivers:
        if not w.used:
            warnings.warn(f"waiver for device {w.device!r}, cases {w.case!r} matched nothing", stacklevel=1)
    _summary(report.summary(), report.verdict())
    if args.json:
        write(args.json, json.dumps(report.to_json(), indent=2))
    if args.junitxml:
        write(args.junitxml, report.to_junit())
    return report.exit_code()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _reporter(total: int) -> tuple[Any, Any, Any]:
    """A rich progress bar on a terminal; one line per case otherwise."""
    if sys.stdout.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        task = progress.add_task("conformance", total=total)

        def on_result(r: Result) -> None:
            progress.update(task, advance=1, description=f"{r.device}: {r.id[:60]}")
            if r.outcome.status in ("failed", "crashed", "timeout"):
                progress.console.print(
                    f"[red]{r.outcome.status.upper()}[/] {r.device} {r.id}: "
                    f"{r.outcome.message.splitlines()[0] if r.outcome.message else ''}"
                )

        return progress, on_result, lambda: None

    def line(r: Result) -> None:
        first = r.outcome.message.splitlines()[0] if r.outcome.message else ""
        print(
            f"{r.outcome.status.upper():15} {r.device} {r.id} ({r.outcome.seconds:.3f}s){' ' + first if first else ''}",
            flush=True,
        )

    return None, line, lambda: None


def _summary(summary: dict[str, dict[str, int]], verdict: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kvfuse conformance — {verdict.replace('_', ' ')}")
    table.add_column("device")
    cols = ("passed", "failed", "crashed", "timeout", "not_applicable", "waived")
    for c in cols:
        table.add_column(c, justify="right")
    for device, counts in summary.items():
        table.add_row(device, *(str(counts[c]) for c in cols))
    Console().print(table)
