"""`edge-inspect`: product-level commands.

edge-inspect demo [--frames N] [--fps F] [--keep-going] [--quick] [--workdir DIR] [--retrain] ...
edge-inspect predict --bundle DIR IMAGE|FOLDER ... [--out DIR] [--config YAML --camera ID]
edge-inspect samples --out DIR [--source elpv|synthetic] [--count N]

Exit codes (engines/cli_common.py, shared by every command): 0 ok; 1 frames unanswered (demo); 2 bad input
(an image that could not be inspected, a missing bundle, ...); 130 interrupted (Ctrl-C or SIGTERM: the demo
still prints the summary and writes the report of what was answered).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from engines.cli_common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Parser,
    add_version,
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
    quick_mode,
    quick_note,
    run_cli,
)

__all__ = ["main", "build_parser"]

PROG = "edge-inspect"
QUICK_FRAMES, QUICK_FPS = 8, 4.0  # EDGE_INSPECT_QUICK: at most this many frames, at least this rate


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="train (or reuse) a model on ELPV solar cells, start the daemon, stream modules",
        description="The main job end to end, offline, on the CPU: a PatchCore model of good ELPV cells "
                    "(cached, keyed by its settings), the real daemon, a simulated camera streaming solar "
                    "modules built from held-out cells over ZeroMQ, a live table, a summary and a report. "
                    "Outputs under --workdir: bundle (the model; configs/demo.yaml points at it), "
                    "latest/report.html (every frame, sortable by score), latest/report.png, "
                    "latest/outcomes.json, latest/daemon.log.")
    p.add_argument("--frames", type=positive_int, help="modules to stream (default 24; --quick 4)")
    p.add_argument("--fps", type=positive_float, help="camera frame rate (default 0.5; --quick 4)")
    p.add_argument("--keep-going", action="store_true",
                   help="stream (cycling the modules) until Ctrl-C; with EDGE_INSPECT_QUICK=1 two passes")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings (60 cells, a small memory bank, 1 x 2 cell modules): seconds, for "
                        "tests; also EDGE_INSPECT_QUICK=1")
    p.add_argument("--workdir", type=Path,
                   help="model cache and run folder (default runs/demo, in the current directory)")
    p.add_argument("--retrain", action="store_true", help="train even when a cached model exists")
    p.add_argument("--bank-fraction", type=fraction,
                   help="share of the good patches kept in the PatchCore memory bank (default 0.1; "
                        "--quick 0.01)")
    p.add_argument("--cell-type", choices=("mono", "poly"), help="ELPV cell type (default mono)")
    p.add_argument("--threads", type=positive_int, help="torch / ONNX Runtime threads (default 1)")
    p.add_argument("--defect-share", type=float, help="share of modules with defective cells (default 0.4)")
    p.add_argument("--seed", type=int, help="seed of the data split, training and module draw (default 0)")
    p.set_defaults(func=cmd_demo)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="inspect image files with a bundle: verdict, score, regions, heat-map pictures",
        description="Each image goes through the daemon's own tiling, fusion and verdict code "
                    "(inspection.pipeline.inspect_frame). Writes <out>/predictions.jsonl (one JSON line per "
                    "image) and <out>/<image name>.png (heat map over the image, regions in red, colour bar "
                    "with the threshold); prints a table (or the JSON lines with --jsonl).")
    p.add_argument("images", nargs="+", metavar="IMAGE|FOLDER",
                   help="image files, or folders whose images (.png .jpg .jpeg .bmp .tif .tiff) are "
                        "inspected")
    p.add_argument("--bundle", required=True, help="model bundle directory (relative: to the current one)")
    p.add_argument("--out", type=Path, default=Path("runs/predict"),
                   help="folder for predictions.jsonl and the pictures")
    p.add_argument("--config", help="daemon YAML config whose inspection settings (and --camera's "
                                    "overrides) to use; default: the pipeline's defaults")
    p.add_argument("--camera", help="camera id of --config whose threshold, ROI and ignore zones apply; "
                                    "default: none")
    p.add_argument("--threshold", type=float, help="image threshold; default: the bundle's (or the config's)")
    p.add_argument("--overlap", type=non_negative_int,
                   help="minimum tile overlap in pixels; default: the config's, else 32")
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "torch", "tensorrt"),
                   help="engine backend (auto: TensorRT > torch CUDA > ONNX Runtime CPU)")
    p.add_argument("--threads", type=positive_int, help="CPU threads of the engine; default: the backend's")
    p.add_argument("--jsonl", action="store_true", help="print the JSON lines instead of the table")
    p.set_defaults(func=cmd_predict)


def _add_samples(sub) -> None:
    p = sub.add_parser(
        "samples", help="write sample images to try the tools on (good/ to train, test/ labelled)",
        description="Writes <out>/good/ (good images for `edge-train train --folder`), <out>/test/good/ and "
                    "<out>/test/<defect type>/ (for `edge-train evaluate --folder` and `edge-inspect "
                    "predict`). ELPV cells are CC BY-NC-SA: keep them out of git (data/ is ignored).")
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write (new, empty, or written by samples before)")
    p.add_argument("--source", choices=("elpv", "synthetic"), default="elpv",
                   help="elpv: solar cells of the installed elpv-dataset package; synthetic: textures with "
                        "painted defects and masks")
    p.add_argument("--count", type=positive_int, default=60,
                   help="good training images; a third as many test images per group "
                        "(EDGE_INSPECT_QUICK=1: 12)")
    p.add_argument("--cell-type", choices=("mono", "poly"), default="mono", help="ELPV cell type")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (ELPV) or the textures (synthetic)")
    p.set_defaults(func=cmd_samples)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Industrial visual inspection.")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_predict(sub)
    _add_samples(sub)
    return parser


# ---- demo ---------------------------------------------------------------------------------------------


def settings_from_args(args):
    from .demo import DemoSettings, default_workdir

    quick = args.quick or quick_mode()
    if quick and not args.quick:
        quick_note(f"{PROG} demo", "quick run (as --quick: 60 cells, a small memory bank, "
                                   "1 x 2 cell modules)")
    workdir = (args.workdir or default_workdir()).resolve()
    s = DemoSettings.quick(workdir) if quick else DemoSettings(workdir=workdir)
    train = s.train
    if args.bank_fraction is not None:
        train = replace(train, bank_fraction=args.bank_fraction)
    if args.cell_type is not None:
        train = replace(train, cell_type=args.cell_type)
    if args.seed is not None:
        train = replace(train, seed=args.seed)
    overrides = {k: v for k, v in {"frames": args.frames, "fps": args.fps, "threads": args.threads,
                                   "defect_share": args.defect_share}.items() if v is not None}
    slow = overrides.get("frames", 0) > QUICK_FRAMES or overrides.get("fps", QUICK_FPS) < QUICK_FPS
    if quick_mode() and slow:
        overrides["frames"] = min(overrides.get("frames", s.frames), QUICK_FRAMES)
        overrides["fps"] = max(overrides.get("fps", s.fps), QUICK_FPS)
        quick_note(f"{PROG} demo", f"--frames {overrides['frames']} --fps {overrides['fps']:g}")
    keep_going = args.keep_going
    if keep_going and quick_mode():
        keep_going = False
        overrides["frames"] = 2 * overrides.get("frames", s.frames)
        quick_note(f"{PROG} demo", f"--keep-going streams two passes ({overrides['frames']} frames)")
    return replace(s, train=train, keep_going=keep_going, retrain=args.retrain, **overrides)


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(settings_from_args(args))
    if result["interrupted"]:
        print(f"{PROG} demo: interrupted (summary and report above cover the frames answered so far)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    s = result["summary"]
    if s["answered"] + s["drops"] != s["frames"] or s["unanswered"] or s["errors"]:
        print(f"{PROG} demo: error: {s['unanswered']} frame(s) unanswered, {s['errors']} error record(s); "
              f"fix: see the daemon log {result['paths']['log']}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


# ---- predict ------------------------------------------------------------------------------------------


def _inspect_config(args):
    from dataclasses import replace as dc_replace

    from inspection.pipeline import InspectConfig

    if args.camera and not args.config:
        raise ValueError("--camera needs --config (the daemon config that lists the camera)")
    if args.config:
        from edge_daemon.config import camera_inspection_mapping, load_config

        cfg = load_config(args.config, bundle=args.bundle)
        if args.camera and cfg.camera(args.camera) is None:
            known = ", ".join(c.id for c in cfg.cameras) or "none"
            raise ValueError(f"--camera {args.camera}: not in {args.config} (cameras: {known})")
        config = InspectConfig.from_mapping(camera_inspection_mapping(cfg, args.camera or ""), "inspection")
    else:
        config = InspectConfig()
    if args.threshold is not None:
        config = dc_replace(config, image_threshold=args.threshold)
    if args.overlap is not None:
        config = dc_replace(config, tile_overlap=args.overlap)
    return config


def cmd_predict(args) -> int:
    from .predict import HEADER, list_inputs, predict_images, say_row

    paths = list_inputs(args.images)
    config = _inspect_config(args)
    if not args.jsonl:
        print(HEADER, flush=True)
    results = predict_images(args.bundle, paths, config, args.out, args.backend, args.threads,
                             on_result=lambda p: say_row(p, args.jsonl))
    failed = [p for p in results if p.error]
    fails = sum(p.verdict == "FAIL" for p in results)
    print(f"{len(results)} image(s): {len(results) - len(failed) - fails} PASS, {fails} FAIL, "
          f"{len(failed)} not inspected; results in {args.out / 'predictions.jsonl'}, "
          f"pictures in {args.out}/",
          file=sys.stderr)
    if failed:
        print(f"{PROG} predict: error: {len(failed)} image(s) could not be inspected, first: "
              f"{failed[0].image}: {failed[0].error}; fix: give readable 8/16-bit images",
              file=sys.stderr)
        return EXIT_USAGE
    return 0


# ---- samples ------------------------------------------------------------------------------------------


def cmd_samples(args) -> int:
    from .samples import SampleCounts, write_samples

    count = args.count
    if quick_mode() and count > 12:
        count = 12
        quick_note(f"{PROG} samples", f"--count {count}")
    counts = SampleCounts(good=count, test_good=max(2, count // 3), test_defect=max(2, count // 3))
    written = write_samples(args.out, args.source, counts, args.cell_type, args.seed)
    for folder, n in written.items():
        print(f"{args.out / folder}/: {n} images")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engines.bundle import BundleError

    fixes = {BundleError: "give --bundle a bundle folder written by `edge-train train` or "
                          "`edge-inspect demo`",
             ValueError: f"see `{PROG} {args.command} --help` (predict: --overlap sets the tile overlap)"}
    return run_cli(f"{PROG} {args.command}", lambda: args.func(args), fixes=fixes)


if __name__ == "__main__":
    sys.exit(main())
