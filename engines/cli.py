"""`edge-engines`: build TensorRT engines ahead of time and check a bundle + engine cache.

  edge-engines build --bundle DIR [--cache DIR] [--precision fp16] [--streams 2] [--max-batch 16]
  edge-engines check --bundle DIR [--cache DIR] [--precision fp16] [--streams 2] [--max-batch 16]

``build`` is meant for systemd ExecStartPre (the daemon then starts on a cache hit). ``check`` verifies the
bundle's checksums, runs one batch through ONNX Runtime on the CPU, and reports whether this GPU's engine is
cached. Exit codes: 0 ok, 1 bundle/engine error, 2 backend unavailable (build) or engine not cached (check,
on a machine where TensorRT could build it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .base import BackendUnavailable, EngineError
from .bundle import BundleError

__all__ = ["main", "build_parser"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="model bundle directory")
    parser.add_argument("--cache", default=None,
                        help="engine cache directory (default ~/.cache/edge-inspect/tensorrt)")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--streams", type=int, default=2, help="streams = optimisation profiles")
    parser.add_argument("--max-batch", type=int, default=16)


def _build(args) -> int:
    from .build import build_engine

    path = build_engine(args.bundle, precision=args.precision, streams=args.streams, max_batch=args.max_batch,
                        cache_dir=args.cache, rebuild=args.rebuild)
    print(json.dumps({"engine": str(path)}))
    return 0


def _smoke_onnxruntime(bundle: str) -> dict:
    import numpy as np

    from .registry import open_engine

    engine = open_engine(bundle, backend="onnxruntime", streams=1, max_batch=1, threads=1)
    try:
        out = engine.infer(np.zeros((1, *engine.input_shape), dtype=np.uint8))
    finally:
        engine.close()
    return {"onnxruntime_ok": bool(np.isfinite(out).all()), "map_shape": list(out.shape[2:])}


def _check(args) -> int:
    from .build import cache_status

    status = cache_status(args.bundle, precision=args.precision, streams=args.streams,
                          max_batch=args.max_batch, cache_dir=args.cache)
    status.update(_smoke_onnxruntime(args.bundle))
    print(json.dumps(status, indent=2))
    if not status["onnxruntime_ok"]:
        return 1
    if status.get("engine") is not None and not status["engine_cached"]:
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-engines", description="Engines: build and check.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the TensorRT engine for a bundle on this GPU (cached)")
    _common(build)
    build.add_argument("--rebuild", action="store_true", help="ignore a cached engine")
    build.set_defaults(func=_build)
    check = sub.add_parser("check", help="verify a bundle and whether its engine is cached")
    _common(check)
    check.set_defaults(func=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except BackendUnavailable as exc:
        print(f"edge-engines: {exc}", file=sys.stderr)
        return 2
    except (BundleError, EngineError) as exc:
        print(f"edge-engines: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
