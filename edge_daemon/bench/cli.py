"""`edge-bench`: one entry point, one module per benchmark.

Each benchmark module exposes ``add_parser(subparsers)`` that registers its sub-command and sets
``func`` on it; modules are imported lazily so that one benchmark's heavy imports do not slow another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "engine": "edge_daemon.bench.engine",
    "pipeline": "edge_daemon.bench.pipeline",
    "latency": "edge_daemon.bench.latency",
    "soak": "edge_daemon.bench.soak",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-bench", description="Benchmarks of the inspection runtime.")
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for module_name in BENCHMARKS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # benchmark not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
