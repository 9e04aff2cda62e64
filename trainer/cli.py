"""`edge-train` / `python -m trainer`: train, pretrain-teacher, evaluate, export.

Bad input (missing folder, no images, unreadable image, mismatched mask, wrong channel count, tile larger than
the image, corrupt checkpoint or bundle, invalid option) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

__all__ = ["main", "build_parser", "train_bundle", "load_data", "build_model"]

EXIT_USAGE = 2
TEACHER_FORMAT = "edge-inspect-teacher"


class UsageError(ValueError):
    """A command-line argument combination that cannot work."""


# ---------------------------------------------------------------- arguments

def _add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("dataset (choose one)")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument("--mvtec", metavar="DIR", help="MVTec-AD root folder (with --category)")
    src.add_argument("--folder", metavar="DIR", help="folder of good images (train/validation only, no test)")
    src.add_argument("--elpv", choices=("mono", "poly"), help="ELPV solar cells of this type (elpv-dataset)")
    g.add_argument("--category", help="MVTec category, e.g. bottle")
    g.add_argument("--resize", type=int, metavar="N",
                   help="resize images (MVTec, folder, ELPV) to N x N first")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="share of good images held out for calibration (MVTec/folder 0.1, ELPV 0.15)")
    g.add_argument("--limit", type=int, help="load at most this many images (quick runs and tests)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data split and of training (default 0)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=("efficientad", "dfr", "reconstruction", "mkd", "tsdn", "saliency"),
                   default="efficientad", help="model kind (docs/model_kinds.md)")
    p.add_argument("--size", default="s", help="model size: efficientad s|m, others s (default s)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="model option passed to create_model (YAML value), repeatable: e.g. alpha=0.5, "
                        "taps=[2,4,8]")
    p.add_argument("--tile", type=int, default=256, help="square tile size in pixels (default 256)")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frr", type=float, default=0.01, help="target false-reject rate on good images (0.01)")
    p.add_argument("--pixel-frr", type=float, default=1e-4,
                   help="false-positive rate of good pixels for the segmentation threshold (1e-4)")
    p.add_argument("--batch-size-eval", type=int, default=8, help="images per evaluation batch (8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-train",
                                     description="Train, evaluate and export anomaly models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train, calibrate, evaluate and export a bundle",
                       description="Train on good images, calibrate map normalisation and thresholds on "
                                   "held-out good images, evaluate when test data exist, export the bundle "
                                   "to --out (model.onnx, core.pt2, bundle.json, config.json, metrics.json, "
                                   "report.png, checkpoint.pt).")
    _add_data(p)
    _add_model(p)
    _add_calibration(p)
    p.add_argument("--steps", type=int, default=70_000, help="training steps (default 70000)")
    p.add_argument("--batch-size", type=int, default=1, help="training batch size (default 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--teacher", metavar="CKPT", help="EfficientAD: teacher checkpoint from pretrain-teacher")
    p.add_argument("--teacher-steps", type=int, default=10_000,
                   help="EfficientAD without --teacher: distillation steps on the training images (10000)")
    p.add_argument("--synthetic-anomalies", action="store_true", help="noise patches as negative examples")
    p.add_argument("--cdo", action="store_true", help="collaborative discrepancy optimisation loss")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints (0: at the end)")
    p.add_argument("--out", required=True, metavar="DIR", help="output bundle folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain-teacher", help="distil the EfficientAD teacher on any image folders",
                       description="Distil EfficientNet-Lite0 features into an EfficientAD teacher PDN on "
                                   "the images of one or more folders; `train --teacher CKPT` loads it.")
    p.add_argument("--images", action="append", required=True, metavar="DIR", help="image folder, repeatable")
    p.add_argument("--size", default="s", help="EfficientAD size s|m (default s)")
    p.add_argument("--tile", type=int, default=256, help="crop size (default 256)")
    p.add_argument("--steps", type=int, default=10_000, help="distillation steps (default 10000)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--limit", type=int, help="at most this many images per folder")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--out", required=True, metavar="CKPT", help="teacher checkpoint file to write")
    p.set_defaults(func=cmd_pretrain_teacher)

    p = sub.add_parser("evaluate", help="metrics of a bundle or a training checkpoint on a dataset",
                       description="A bundle runs through ONNX Runtime on overlapping tiles with its own "
                                   "thresholds; a checkpoint is re-calibrated on the validation split.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", metavar="DIR", help="bundle folder")
    src.add_argument("--checkpoint", metavar="CKPT", help="training checkpoint (checkpoint.pt)")
    _add_data(p)
    _add_model(p)
    _add_calibration(p)
    p.add_argument("--out", metavar="DIR", help="write metrics.json and report.png here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a training checkpoint as a bundle",
                       description="Load a checkpoint, calibrate on the dataset's validation split, evaluate "
                                   "when test data exist, and write the bundle.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="training checkpoint (checkpoint.pt)")
    _add_data(p)
    _add_model(p)
    _add_calibration(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output bundle folder")
    p.set_defaults(func=cmd_export)
    return parser


# ---------------------------------------------------------------- building blocks

def load_data(args):
    """DataSplits from --mvtec/--folder/--elpv arguments."""
    from .data import load_folder
    from .data.elpv import load_elpv
    from .data.mvtec import load_mvtec

    val = {} if args.val_fraction is None else {"val_fraction": args.val_fraction}
    if args.mvtec:
        if not args.category:
            raise UsageError("--mvtec needs --category")
        return load_mvtec(args.mvtec, args.category, seed=args.seed, resize_to=args.resize, limit=args.limit,
                          **val)
    if args.folder:
        return load_folder(args.folder, seed=args.seed, resize_to=args.resize, limit=args.limit, **val)
    return load_elpv(args.elpv, seed=args.seed, limit=args.limit, resize_to=args.resize, **val)


def parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def build_model(kind: str, size: str, tile: int, options: dict):
    from .models import create_model

    extra = {"tile": tile} if kind == "efficientad" else {}
    return create_model(kind, size, **{**extra, **options})


class ProgressBar:
    """fit/pretrain_teacher progress callback -> tqdm bars (one per phase) with loss and ETA."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar, self.phase, self.last = enabled, None, None, 0

    def __call__(self, step: int, total: int, info: dict) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        phase = "teacher" if "teacher_loss" in info else "train"
        if self.bar is None or phase != self.phase or step < self.last:
            self.close()
            self.bar = tqdm(total=total, desc=phase, unit="step", file=sys.stderr)
            self.phase, self.last = phase, 0
        self.bar.update(step - self.last)
        self.last = step
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items() if isinstance(v, float)})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def load_teacher(model, path: str | Path) -> None:
    from .fit import CheckpointError, load_state_file

    state = load_state_file(path, "teacher checkpoint", TEACHER_FORMAT,
                            "a teacher checkpoint written by `edge-train pretrain-teacher`")
    if getattr(model, "kind", None) != "efficientad" or state.get("size") != model.size:
        raise CheckpointError(f"teacher checkpoint {path} is for efficientad-{state.get('size')}, "
                              f"the model is {getattr(model, 'kind', '?')}-{getattr(model, 'size', '?')}")
    try:
        model.teacher.load_state_dict(state["teacher"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"teacher checkpoint {path} does not match the teacher network: {exc}") from exc
    model.teacher_trained.fill_(True)


def _model_from_checkpoint(args):
    """A trained model from a fit checkpoint; options from config.json beside it when present."""
    from .fit import read_checkpoint, restore_model

    state = read_checkpoint(args.checkpoint)
    options, tile = parse_options(args.option), args.tile
    config_path = Path(args.checkpoint).parent / "config.json"
    if config_path.is_file():
        saved = json.loads(config_path.read_text()).get("model", {})
        options = {**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.get("options", {}).items()},
                   **options}
        tile = saved.get("tile", tile)
    model = build_model(state["kind"], state["size"], tile, options)
    return restore_model(model, state).eval(), tile, options


# ---------------------------------------------------------------- the pipeline

def calibrate_model(model, val_images, tile: int, frr: float, pixel_frr: float, batch_size: int = 8):
    """(MapSpec, Thresholds, validation maps) from held-out good images."""
    from .calibrate import calibrate_thresholds, map_spec_from_raw
    from .evaluate import normalise, raw_maps

    raw = raw_maps(model, val_images, batch_size)
    spec = map_spec_from_raw(raw, model.map_weights, tile, stride=model.map_stride)
    maps = normalise(raw, spec)
    return spec, calibrate_thresholds(maps, frr, pixel_frr), maps


def evaluate_and_report(maps, test, thresholds, out_dir: Path | None, title: str) -> dict:
    """Metrics of normalised test maps; with out_dir, report.png."""
    from .evaluate import evaluate_maps
    from .metrics import roc_curve
    from .report import pick_panels, write_report

    result = evaluate_maps(maps, test, thresholds)
    if out_dir is not None:
        main = ~np.isin(np.array(test.groups), test.separate_groups)
        fpr, tpr, _ = roc_curve(result.scores[main], test.labels[main])
        panels = pick_panels(test.images, maps, result.scores, test.labels, test.names, test.masks)
        write_report(out_dir / "report.png", {"image": (fpr, tpr, result.metrics["image_auroc"])}, panels,
                     title=title, vmax=max(thresholds.image * 2, 1e-6) if thresholds else None)
    return result.metrics


def _finish(model, splits, args, out: Path, tile: int, options: dict, training: dict) -> dict:
    from .evaluate import model_maps
    from .export import export_model

    out.mkdir(parents=True, exist_ok=True)
    spec, thresholds, val_maps = calibrate_model(model, splits.val, tile, args.frr, args.pixel_frr,
                                                 args.batch_size_eval)
    metrics: dict = {"thresholds": asdict(thresholds)}
    title = f"{model.kind}-{model.size} on {splits.name}"
    if splits.test is not None:
        test_maps = model_maps(model, splits.test.images, spec, args.batch_size_eval)
        metrics.update(evaluate_and_report(test_maps, splits.test, thresholds, out, title))
    else:
        from .report import Panel, write_report

        panels = [Panel(im, m, f"validation {i}")
                  for i, (im, m) in enumerate(zip(splits.val, val_maps, strict=True))][:8]
        write_report(out / "report.png", {}, panels, title=title + " (validation, no test set)")
    config = {"model": {"kind": model.kind, "size": model.size, "options": options, "tile": tile},
              "data": splits.info, "args": {k: v for k, v in vars(args).items() if k != "func"}}
    export_model(model, out, tile=tile, channels=splits.channels, map_spec=spec, thresholds=thresholds,
                 training_summary=training, metrics=metrics, config=config)
    return metrics


def train_bundle(args, progress: bool = True) -> dict:
    """The `train` command as a function: returns the metrics dict (also written to --out/metrics.json)."""
    from .data.images import check_tile
    from .fit import TrainConfig, fit

    out = Path(args.out)
    splits = load_data(args)
    check_tile(splits.train, args.tile)
    options = parse_options(args.option)
    model = build_model(args.kind, args.size, args.tile, options)
    if args.teacher:
        load_teacher(model, args.teacher)
    out.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         teacher_steps=args.teacher_steps, synthetic_anomalies=args.synthetic_anomalies,
                         cdo=args.cdo, checkpoint_path=str(out / "checkpoint.pt"),
                         checkpoint_every=args.checkpoint_every, resume=args.resume, tile=args.tile)
    bar = ProgressBar(progress)
    try:
        history = fit(model, splits.train, config, progress=bar)
    finally:
        bar.close()
    loss = history.get("loss", [])
    training = {"steps": history.get("steps"), "seconds": round(float(history.get("seconds", 0.0)), 2),
                "final_loss": float(np.mean(loss[-10:])) if loss else None, "teacher": args.teacher,
                "n_train": len(splits.train), "n_val": len(splits.val), "latent": history.get("latent")}
    metrics = _finish(model, splits, args, out, args.tile, options, training)
    metrics["training"] = training
    return metrics


# ---------------------------------------------------------------- commands

def cmd_train(args) -> int:
    metrics = train_bundle(args)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    print(f"bundle written to {args.out}")
    return 0


def cmd_pretrain_teacher(args) -> int:
    import torch

    from .data.images import check_tile, read_images, to_channels
    from .fit import TrainConfig, pretrain_teacher

    images = []
    for folder in args.images:
        found, paths = read_images(folder, limit=args.limit, seed=args.seed)
        check_tile(found, args.tile, paths)
        images.extend(to_channels(im, 3) for im in found)
    model = build_model("efficientad", args.size, args.tile, {})
    config = TrainConfig(steps=0, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         teacher_steps=args.steps, tile=args.tile)
    bar = ProgressBar()
    try:
        summary = pretrain_teacher(model, images, config, progress=bar)
    finally:
        bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": TEACHER_FORMAT, "version": 1, "size": args.size,
                "teacher": model.teacher.state_dict(), "images": len(images), "steps": args.steps}, out)
    loss = summary.get("loss", [])
    print(f"teacher checkpoint written to {out} ({len(images)} images, {args.steps} steps, "
          f"final loss {np.mean(loss[-10:]) if loss else float('nan'):.4g})")
    return 0


def cmd_evaluate(args) -> int:
    splits = load_data(args)
    if splits.test is None:
        raise UsageError(f"{splits.name} has no labelled test images to evaluate on")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if args.bundle:
        from engines.bundle import read_bundle

        from .calibrate import Thresholds
        from .evaluate import bundle_maps

        meta = read_bundle(args.bundle)
        if meta.input.channels != splits.channels:
            raise UsageError(f"bundle expects {meta.input.channels}-channel images, the dataset has "
                             f"{splits.channels}")
        thresholds = Thresholds(meta.image_threshold, meta.pixel_threshold, meta.target_false_reject_rate)
        maps = bundle_maps(args.bundle, splits.test.images, args.batch_size_eval)
        metrics = evaluate_and_report(maps, splits.test, thresholds, out, f"{meta.model_id} on {splits.name}")
    else:
        from .evaluate import model_maps

        model, tile, _ = _model_from_checkpoint(args)
        spec, thresholds, _ = calibrate_model(model, splits.val, tile, args.frr, args.pixel_frr,
                                              args.batch_size_eval)
        maps = model_maps(model, splits.test.images, spec, args.batch_size_eval)
        metrics = evaluate_and_report(maps, splits.test, thresholds, out, f"{model.kind}-{model.size}")
        metrics["thresholds"] = asdict(thresholds)
    if out is not None:
        from .export import write_json

        write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2, default=float))
    return 0


def cmd_export(args) -> int:
    model, tile, options = _model_from_checkpoint(args)
    splits = load_data(args)
    training = {"checkpoint": str(args.checkpoint)}
    metrics = _finish(model, splits, args, Path(args.out), tile, options, training)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    print(f"bundle written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        code = int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # DataError, CheckpointError, BundleError, MetricError, UsageError
        message = " ".join(str(exc).split())  # one line, whatever the exception text holds
        print(f"edge-train {args.command}: error: {message[:400]}", file=sys.stderr)
        return EXIT_USAGE
    print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
