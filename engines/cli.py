"""`edge-engines`: build TensorRT engines ahead of time, check a bundle + engine cache, add an INT8 graph,
Triton repositories.

  edge-engines build --bundle DIR [--cache DIR] [--precision fp16] [--streams 2] [--max-batch 16]
  edge-engines check --bundle DIR [--cache DIR] [--precision fp16] [--streams 2] [--max-batch 16]
  edge-engines quantize --bundle DIR (--images DIR | --elpv mono|poly) [--tiles 64] [--method minmax]
                        [--limit N] [--full-range] [--anomaly-fraction 0.25] [--quantize-all] [--seed 0]
  edge-engines triton-repo --bundle DIR --out REPO [--format onnx|tensorrt|python] [--precision fp16]
                           [--max-batch 16] [--instances 1] [--kind cpu|gpu] [--queue-delay-us 500]
  edge-engines triton-serve --repo REPO [--grpc-port 8001] [--http-port 8000]   # the CPU server (dev, CI)
  edge-engines triton-serve --build-only                                         # only its virtualenv

``build`` is meant for systemd ExecStartPre (the daemon then starts on a cache hit). ``check`` verifies the
bundle's checksums, runs one batch through ONNX Runtime on the CPU, and reports whether this GPU's engine is
cached. ``quantize`` adds model.int8.onnx (engines.quantize), calibrated on tiles of good images; it reads
images with trainer.data (imported only by this command). docs/scale-out.md describes the Triton commands.
Exit codes (engines/cli_common.py, shared by every command): 0 ok; 1 the check failed (ONNX Runtime gave
non-finite maps, or this GPU's engine is not cached although TensorRT could build it: run
``edge-engines build``), an engine failed; 2 a missing or corrupt bundle, bad calibration data, a backend this
machine cannot run.
"""

from __future__ import annotations

import json
import logging
import sys

from .base import BackendUnavailable, EngineError
from .bundle import BundleError
from .cli_common import EXIT_FAILURE, EXIT_USAGE, Parser, add_version, positive_int, run_cli

__all__ = ["main", "build_parser"]

PROG = "edge-engines"
FIXES = {
    BundleError: "point --bundle at a bundle folder written by `edge-train train` or `edge-train export` "
                 "(model.onnx, core.pt2, bundle.json); re-export it if a file changed",
    BackendUnavailable: "run this on a machine with an NVIDIA GPU and TensorRT (pip install "
                        "edge-inspect[trt]); on the CPU the daemon uses ONNX Runtime and needs no engine",
    EngineError: "check the bundle with `edge-engines check --bundle DIR`; rebuild with --rebuild",
}


def _common(parser) -> None:
    parser.add_argument("--bundle", required=True,
                        help="model bundle directory (relative: to the current one)")
    parser.add_argument("--cache", default=None,
                        help="engine cache directory (default ~/.cache/edge-inspect/tensorrt)")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "fp32", "tf32"],
                        help="TensorRT precision (fp32 is IEEE FP32; tf32 only when asked for)")
    parser.add_argument("--streams", type=positive_int, default=2,
                        help="batches in flight = TensorRT optimisation profiles")
    parser.add_argument("--max-batch", type=positive_int, default=16, help="largest batch of tiles per call")


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
        print(f"{PROG} check: error: ONNX Runtime returned non-finite maps for {args.bundle}; "
              f"fix: re-export the bundle", file=sys.stderr)
        return EXIT_FAILURE
    if status.get("engine") is not None and not status["engine_cached"]:
        print(f"{PROG} check: error: the TensorRT engine for this GPU is not cached in "
              f"{status['cache_dir']}; fix: run `edge-engines build --bundle {args.bundle}` (ExecStartPre)",
              file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _triton_repo(args) -> int:
    from .triton_repo import write_repository

    precision = args.precision or ("fp16" if args.format == "tensorrt" else "fp32")
    model_dir = write_repository(args.bundle, args.out, name=args.name, fmt=args.format,
                                 max_batch=args.max_batch, precision=precision, instances=args.instances,
                                 kind=args.kind, queue_delay_us=args.queue_delay_us, threads=args.threads,
                                 cache_dir=args.cache, force=args.force)
    print(json.dumps({"repository": str(model_dir.parent), "model": model_dir.name, "format": args.format,
                      "precision": precision}))
    return 0


def _triton_serve(args) -> int:
    from pathlib import Path

    from .triton_local import build_server_env, serve_foreground

    env = build_server_env(args.server_dir)
    if args.build_only:
        print(json.dumps({"server_dir": str(env.root), "binary": str(env.binary)}))
        return 0
    if args.repo is None:
        raise EngineError("triton-serve needs --repo (or --build-only)")
    tls = {"cert": args.tls_cert, "key": args.tls_key, "ca": args.tls_ca} if args.tls_cert else None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise EngineError("--tls-cert and --tls-key come together")
    serve_foreground(env, Path(args.repo).resolve(), args.grpc_port, args.http_port, args.host, tls)
    return 0  # not reached: the server replaced this process


def _add_triton(sub) -> None:
    repo = sub.add_parser("triton-repo", help="write a Triton model repository for a bundle")
    repo.add_argument("--bundle", required=True, help="model bundle directory")
    repo.add_argument("--out", required=True, help="repository directory (created; the model is OUT/NAME)")
    repo.add_argument("--name", default=None,
                      help="model name in the repository (default KIND-SIZE of the bundle)")
    repo.add_argument("--format", default="onnx", choices=["onnx", "tensorrt", "python"],
                      help="onnx: Triton's onnxruntime backend; tensorrt: a plan built here by "
                           "engines.build (on the GPU it will serve from); python: our ONNX Runtime engine "
                           "in Triton's Python backend (what the CPU server of triton-serve loads)")
    repo.add_argument("--precision", default=None, choices=["fp32", "fp16"],
                      help="default fp16 for tensorrt, fp32 otherwise (python: fp32 only)")
    repo.add_argument("--max-batch", type=int, default=16, help="max_batch_size: tiles per server batch")
    repo.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    repo.add_argument("--kind", default=None, choices=["cpu", "gpu"],
                      help="instance kind (default cpu for python, gpu otherwise)")
    repo.add_argument("--queue-delay-us", type=int, default=500,
                      help="dynamic batching: longest wait to fill a preferred batch size")
    repo.add_argument("--threads", type=int, default=0,
                      help="python format: ONNX Runtime threads per instance (0: cores / instances)")
    repo.add_argument("--cache", default=None, help="tensorrt format: engine cache directory")
    repo.add_argument("--force", action="store_true", help="replace OUT/NAME if it exists")
    repo.set_defaults(func=_triton_repo)
    serve = sub.add_parser("triton-serve",
                           help="run the CPU Triton server of nvidia-pytriton on a repository")
    serve.add_argument("--repo", default=None, help="model repository (from triton-repo --format python)")
    serve.add_argument("--server-dir", default=None,
                       help="server virtualenv directory (default $EDGE_INSPECT_CACHE/triton-server-<hash>; "
                            "built with /usr/bin/python3.11 on first use)")
    serve.add_argument("--host", default="127.0.0.1", help="address the gRPC and HTTP endpoints bind to")
    serve.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    serve.add_argument("--http-port", type=int, default=8000, help="HTTP port")
    serve.add_argument("--tls-cert", default=None, help="gRPC TLS: server certificate (PEM)")
    serve.add_argument("--tls-key", default=None, help="gRPC TLS: server private key (PEM)")
    serve.add_argument("--tls-ca", default=None, help="gRPC TLS: CA of client certificates (mutual TLS)")
    serve.add_argument("--build-only", action="store_true", help="only build the server virtualenv and exit")
    serve.set_defaults(func=_triton_serve)


def _calibration_images(args, meta) -> tuple[list, str]:
    """Good images for INT8 calibration: a folder, or the ELPV training split the bundle was trained on."""
    import json
    from pathlib import Path

    if args.images:
        from trainer.data.images import read_images

        images, _ = read_images(args.images, channels=meta.input.channels, limit=args.limit, seed=args.seed)
        return images, f"folder {args.images}"
    from trainer.data.elpv import load_elpv

    config = Path(args.bundle) / "config.json"
    data = json.loads(config.read_text()).get("data", {}) if config.is_file() else {}
    same = data.get("source") == "elpv" and data.get("type") == args.elpv
    keys = ("seed", "limit", "resize_to", "val_fraction", "test_good_fraction")
    split = {k: data[k] for k in keys if same and data.get(k) is not None}
    images = load_elpv(args.elpv, **split).train
    if args.limit is not None:
        images = images[:args.limit]
    return images, f"elpv {args.elpv} training cells {split or '(default split)'}"


def _quantize(args) -> int:
    from .bundle import read_bundle
    from .quantize import KEEP_FP32, quantize_bundle

    meta = read_bundle(args.bundle)
    images, source = _calibration_images(args, meta)
    final = quantize_bundle(args.bundle, images, count=args.tiles, seed=args.seed, method=args.method,
                            reduce_range=not args.full_range, source=source,
                            keep_fp32=() if args.quantize_all else KEEP_FP32,
                            anomaly_fraction=args.anomaly_fraction)
    entry = final.files["onnx_int8"]
    print(json.dumps({"int8": entry["path"], "sha256": entry["sha256"], **entry["quantization"]}, indent=2))
    return 0


def _add_quantize(sub) -> None:
    from .quantize import ANOMALY_FRACTION, METHODS

    quantize = sub.add_parser(
        "quantize", help="add an INT8 graph (model.int8.onnx) calibrated on good images",
        description="Static INT8 quantisation (QDQ, per-channel weights) of the bundle's model.onnx; "
                    "pre/post-processing stays FP32 (docs/engines.md).")
    quantize.add_argument("--bundle", required=True, help="model bundle directory (gets model.int8.onnx)")
    source = quantize.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="folder of good images (e.g. the training images)")
    source.add_argument("--elpv", choices=("mono", "poly"),
                        help="ELPV good training cells of this type (split from the bundle's config.json)")
    quantize.add_argument("--tiles", type=int, default=64, help="calibration tiles, cut at random (64)")
    quantize.add_argument("--limit", type=int, default=None, help="use at most this many images")
    quantize.add_argument("--method", choices=METHODS, default="minmax",
                          help="activation range calibration (default minmax)")
    quantize.add_argument("--full-range", action="store_true",
                          help="8-bit weights instead of 7-bit: only for CPUs with VNNI or AMX (8-bit "
                               "weights saturate on AVX2 without VNNI)")
    quantize.add_argument("--anomaly-fraction", type=float, default=ANOMALY_FRACTION,
                          help=f"share of calibration tiles given a noise square, so that activation ranges "
                               f"cover abnormal responses too (default {ANOMALY_FRACTION})")
    quantize.add_argument("--quantize-all", action="store_true",
                          help="also quantise the input and depthwise convolutions (kept FP32 by default)")
    quantize.add_argument("--seed", type=int, default=0, help="seed of the image subset and tile crops (0)")
    quantize.set_defaults(func=_quantize)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Engines: build, check, quantize, Triton repositories.")
    add_version(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = sub.add_parser("build", help="build the TensorRT engine for a bundle on this GPU (cached)")
    _common(build)
    build.add_argument("--rebuild", action="store_true", help="ignore a cached engine")
    build.set_defaults(func=_build)
    check = sub.add_parser("check", help="verify a bundle and whether its engine is cached")
    _common(check)
    check.set_defaults(func=_check)
    _add_quantize(sub)
    _add_triton(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    return run_cli(f"{PROG} {args.command}", lambda: args.func(args), fixes=FIXES,
                   codes={BackendUnavailable: EXIT_USAGE, BundleError: EXIT_USAGE})


if __name__ == "__main__":
    sys.exit(main())
