"""`edge-daemon`: run the inspection daemon, or check a config.

edge-daemon run --config configs/demo.yaml [--bundle runs/demo/bundle] [--stop-after S]
edge-daemon check-config configs/demo.yaml [--bundle DIR]
edge-daemon child ROLE ...   (internal: started by the supervisor)

Both commands validate the config, open the bundle, check the tiling and bind-test every TCP port the daemon
binds before anything starts; a problem is one line on stderr and exit 2 (engines/cli_common.py). `run` exits
0 after a clean stop on SIGTERM or Ctrl-C (its normal way to stop), 1 when a child failed or the drain did
not finish in time.
"""

from __future__ import annotations

import sys

from engines.cli_common import (
    EXIT_USAGE,
    CliError,
    Parser,
    add_version,
    positive_float,
    quick_mode,
    quick_note,
    run_cli,
)

from .config import ConfigError, load_config

__all__ = ["main", "build_parser", "validate"]

PROG = "edge-daemon"
QUICK_STOP_AFTER_S = 3.0
FIXES = {ConfigError: "correct that key in the config file (configs/example.yaml lists every key with its "
                      "default), or pass --bundle DIR"}


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Industrial inspection daemon (ZeroMQ).")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,check-config}")
    run = sub.add_parser("run", help="serve: ingest -> workers -> publisher (SIGTERM or Ctrl-C stops it)")
    run.add_argument("--config", required=True, help="YAML config (every key: configs/example.yaml)")
    run.add_argument("--bundle", help="model bundle directory; overrides engine.bundle (relative: to the "
                                      "current directory)")
    run.add_argument("--stop-after", type=positive_float, metavar="S",
                     help="stop (as on SIGTERM) S seconds after the daemon is ready: smoke tests; default: "
                          f"run until stopped ({QUICK_STOP_AFTER_S:g} s with EDGE_INSPECT_QUICK=1)")
    check = sub.add_parser("check-config", help="validate a config, open its bundle, bind-test its ports; "
                                                "exit 0 when usable")
    check.add_argument("config", help="YAML config file to check")
    check.add_argument("--bundle", help="model bundle directory; overrides engine.bundle (relative: to the "
                                        "current directory)")
    child = sub.add_parser("child")  # internal: started by the supervisor; not listed in --help
    child.add_argument("role", choices=("ingest", "worker", "publisher", "single"))
    child.add_argument("--runtime-dir", required=True)
    child.add_argument("--index", type=int, default=0)
    child.add_argument("--gen", type=int, default=1)
    child.add_argument("--parent", type=int, required=True)
    return parser


def validate(config_path: str, bundle: str | None):
    """(DaemonConfig, BundleMeta) after every check that needs no child: config, bundle, tiling, ports.

    ConfigError names the key (the bundle's and the tiling's errors are reported as config errors)."""
    from engines.bundle import BundleError, read_bundle

    from .ports import check_ports
    from .worker import check_tiling, inspect_configs

    cfg = load_config(config_path, bundle=bundle)
    try:
        meta = read_bundle(cfg.engine.bundle)
        check_tiling(inspect_configs(cfg, meta), meta)
    except BundleError as exc:
        raise CliError(f"engine.bundle: {exc}", "pass --bundle DIR or set engine.bundle to a bundle folder "
                                                "(`edge-inspect demo` writes runs/demo/bundle)") from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    check_ports(cfg)
    return cfg, meta


def _check(args) -> int:
    cfg, meta = validate(args.config, args.bundle)
    print(
        f"ok: {args.config}: model {meta.model_id} ({meta.input.height}x{meta.input.width}x"
        f"{meta.input.channels} tiles), bundle {cfg.engine.bundle}, backend {cfg.engine.backend}, "
        f"{cfg.workers} worker(s) (process_mode {cfg.process_mode}), {len(cfg.cameras)} camera(s) "
        f"configured, ingest {cfg.endpoints.ingest}, output {cfg.endpoints.output}, ports free"
    )
    return 0


def _run(args) -> int:
    from .supervisor import run_daemon

    cfg, _ = validate(args.config, args.bundle)
    stop_after = args.stop_after
    if stop_after is None and quick_mode():
        stop_after = QUICK_STOP_AFTER_S
        quick_note(f"{PROG} run", f"stopping {stop_after:g} s after the daemon is ready")
    return run_daemon(cfg, stop_after_s=stop_after)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "child":
        from .supervisor import child_main

        return child_main(args.role, args.runtime_dir, args.index, args.gen, args.parent)
    func = _check if args.command == "check-config" else _run
    return run_cli(f"{PROG} {args.command}", lambda: func(args), fixes=FIXES, codes={ConfigError: EXIT_USAGE})


if __name__ == "__main__":
    sys.exit(main())
