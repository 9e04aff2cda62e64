"""`edge-daemon`: run the inspection daemon, or check a config.

edge-daemon run --config configs/demo.yaml [--bundle runs/demo/bundle]
edge-daemon check-config configs/demo.yaml [--bundle DIR]
edge-daemon child ROLE ...   (internal: started by the supervisor)
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-daemon", description="Industrial inspection daemon (ZeroMQ).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve: ingest -> workers -> publisher")
    run.add_argument("--config", required=True, help="YAML config (see configs/example.yaml)")
    run.add_argument("--bundle", help="model bundle directory; overrides engine.bundle")
    check = sub.add_parser("check-config", help="validate a config and open its bundle; exit 0 when usable")
    check.add_argument("config")
    check.add_argument("--bundle", help="model bundle directory; overrides engine.bundle")
    child = sub.add_parser("child", help=argparse.SUPPRESS)
    child.add_argument("role", choices=("ingest", "worker", "publisher"))
    child.add_argument("--runtime-dir", required=True)
    child.add_argument("--index", type=int, default=0)
    child.add_argument("--gen", type=int, default=1)
    child.add_argument("--parent", type=int, required=True)
    return parser


def _check(args) -> int:
    from engines.bundle import BundleError, read_bundle

    from .worker import check_tiling, inspect_configs

    try:
        cfg = load_config(args.config, bundle=args.bundle)
        meta = read_bundle(cfg.engine.bundle)
        check_tiling(inspect_configs(cfg), meta)
    except (ConfigError, BundleError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(
        f"ok: {args.config}: model {meta.model_id} ({meta.input.height}x{meta.input.width}x"
        f"{meta.input.channels} tiles), backend {cfg.engine.backend}, {cfg.workers} worker(s), "
        f"{len(cfg.cameras)} camera(s) configured, ingest {cfg.endpoints.ingest}, "
        f"output {cfg.endpoints.output}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return _check(args)
    if args.command == "child":
        from .supervisor import child_main

        return child_main(args.role, args.runtime_dir, args.index, args.gen, args.parent)
    try:
        cfg = load_config(args.config, bundle=args.bundle)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from .supervisor import run_daemon

    return run_daemon(cfg)


if __name__ == "__main__":
    sys.exit(main())
