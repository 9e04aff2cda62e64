"""`edge-bench`: one entry point, one module per benchmark.

Each benchmark module exposes ``add_parser(subparsers)`` that registers its sub-command and sets
``func`` on it; modules are imported lazily so that one benchmark's heavy imports do not slow another.
With EDGE_INSPECT_QUICK=1 (README, CI) each benchmark runs a bounded, tiny version of itself and says so on
stderr; its figures then mean nothing. Exit codes: engines/cli_common.py (0 ok, 1 the run failed or lost
frames, 2 bad input, 130 interrupted).
"""

from __future__ import annotations

import importlib
import sys

from engines.cli_common import Parser, add_version, quick_mode, quick_note, run_cli

BENCHMARKS = {
    "engine": "edge_daemon.bench.engine",
    "pipeline": "edge_daemon.bench.pipeline",
    "latency": "edge_daemon.bench.latency",
    "soak": "edge_daemon.bench.soak",
}
PROG = "edge-bench"
FIX = "see `edge-bench BENCHMARK --help`"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Benchmarks of the inspection runtime.")
    add_version(parser)
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for module_name in BENCHMARKS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # benchmark not built yet
        module.add_parser(sub)
    return parser


def apply_quick(args, caps: dict) -> None:
    """EDGE_INSPECT_QUICK=1: lower each ``caps`` attribute to its cap (None: set it), and say so."""
    if not quick_mode():
        return
    changed = []
    for name, cap in caps.items():
        value = getattr(args, name)
        if callable(cap):
            new = cap(value)
        else:
            new = cap if value is None or (isinstance(cap, (int, float)) and value > cap) else value
        if new != value:
            setattr(args, name, new)
            changed.append(f"--{name.replace('_', '-')} {new}")
    if changed:
        quick_note(f"{PROG} {args.benchmark}", "quick run, figures mean nothing: " + ", ".join(changed))


def main(argv: list[str] | None = None) -> int:
    from engines.bundle import BundleError

    args = build_parser().parse_args(argv)
    if hasattr(args, "quick_caps"):
        apply_quick(args, args.quick_caps)
    return run_cli(f"{PROG} {args.benchmark}", lambda: args.func(args),
                   fixes={BundleError: "give --bundle a bundle folder written by `edge-train train` or "
                                       "`edge-train export`", ValueError: FIX})


if __name__ == "__main__":
    sys.exit(main())
