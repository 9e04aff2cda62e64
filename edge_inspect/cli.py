"""`edge-inspect`: product-level commands.

edge-inspect demo [--frames N] [--fps F] [--keep-going] [--quick] [--workdir DIR] [--retrain] ...
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-inspect", description="Industrial visual inspection.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo", help="train (or reuse) a model on ELPV solar cells, start the daemon, stream modules",
        description="The main job end to end, offline, on the CPU: a DFR model trained on good ELPV cells "
                    "(cached, keyed by its settings), the real daemon, a simulated camera streaming solar "
                    "modules built from held-out cells over ZeroMQ, a live table, a summary and a report "
                    "(report.html, report.png) with fused heat maps.")
    p.add_argument("--frames", type=int, help="modules to stream (default 24; --quick 4)")
    p.add_argument("--fps", type=float, help="camera frame rate (default 0.5; --quick 4)")
    p.add_argument("--keep-going", action="store_true", help="stream (cycling the modules) until Ctrl-C")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings (a few training steps, 1 x 2 cell modules): seconds, for tests")
    p.add_argument("--workdir", type=Path, help="cache and run folder (default ~/.cache/edge-inspect/demo)")
    p.add_argument("--retrain", action="store_true", help="train even when a cached model exists")
    p.add_argument("--steps", type=int, help="training steps (default 300)")
    p.add_argument("--cell-type", choices=("mono", "poly"), help="ELPV cell type (default mono)")
    p.add_argument("--threads", type=int, help="torch / ONNX Runtime threads (default 1)")
    p.add_argument("--defect-share", type=float, help="share of modules with defective cells (0.4)")
    p.add_argument("--seed", type=int, help="seed of the data split, training and module draw (0)")
    p.set_defaults(func=cmd_demo)
    return parser


def settings_from_args(args):
    from .demo import DemoSettings, default_workdir

    workdir = args.workdir or default_workdir()
    s = DemoSettings.quick(workdir) if args.quick else DemoSettings(workdir=workdir)
    train = s.train
    if args.steps is not None:
        train = replace(train, steps=args.steps)
    if args.cell_type is not None:
        train = replace(train, cell_type=args.cell_type)
    if args.seed is not None:
        train = replace(train, seed=args.seed)
    overrides = {k: v for k, v in {"frames": args.frames, "fps": args.fps, "threads": args.threads,
                                   "defect_share": args.defect_share}.items() if v is not None}
    return replace(s, train=train, keep_going=args.keep_going, retrain=args.retrain, **overrides)


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(settings_from_args(args))
    s = result["summary"]
    return 0 if s["answered"] == s["frames"] and s["unanswered"] == 0 else 1


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the daemon and the camera
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, OSError) as exc:
        message = " ".join(str(exc).split())
        print(f"edge-inspect {args.command}: error: {message[:2000]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edge-inspect {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
