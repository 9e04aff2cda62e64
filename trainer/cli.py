"""`edge-train` / `python -m trainer`: train, pretrain-teacher, evaluate, export.

Bad input (missing folder, no images, unreadable image, mismatched mask, wrong channel count, tile larger than
the image, corrupt checkpoint or bundle, invalid option or config key) prints one line on stderr and exits
with status 2; Ctrl-C or SIGTERM exits 130 (the exit codes of engines/cli_common.py, shared by every command).
``train --config FILE`` reads the options from a YAML mapping with the options' names as keys
(``kind: dfr``, ``tile: 256``, ``option: {taps: [2, 4, 8]}``); options on the command line override it, and
the settings used are written back into the bundle as ``train.yaml``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import yaml

from engines.cli_common import (
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

__all__ = ["main", "build_parser", "train_bundle", "load_data", "build_model"]

KINDS = ("patchcore", "efficientad", "dfr", "reconstruction", "mkd", "tsdn", "saliency")
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM: training stopped, the bundle of what was learnt is written


class UsageError(ValueError):
    """A command-line argument combination that cannot work."""


# ---------------------------------------------------------------- arguments

FOLDER_HELP = ("flat folder of good images (train/validation only, no test): .png .jpg .jpeg .bmp .tif "
               ".tiff, one channel count, >= 2 images, each at least --tile pixels wide and high")
LABELLED_HELP = ("labelled folder: good/ plus one folder per defect type, optional "
                 "ground_truth/<type>/<name>_mask.png (MVTec naming); the same metrics as MVTec")


def _add_data(p: argparse.ArgumentParser, required: bool = True, folder_help: str = FOLDER_HELP) -> None:
    g = p.add_argument_group("dataset (choose one)")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument("--mvtec", metavar="DIR", help="MVTec-AD root folder (with --category)")
    src.add_argument("--folder", metavar="DIR", help=folder_help)
    src.add_argument("--elpv", choices=("mono", "poly"), help="ELPV solar cells of this type (elpv-dataset)")
    g.add_argument("--category", help="MVTec category, e.g. bottle")
    g.add_argument("--resize", type=positive_int, metavar="N",
                   help="resize images (MVTec, folder, ELPV) to N x N first; default: native size")
    g.add_argument("--val-fraction", type=fraction, default=None,
                   help="share of good images held out for calibration (default: MVTec/folder 0.1, "
                        "ELPV 0.15)")
    g.add_argument("--limit", type=positive_int,
                   help="load at most this many images (quick runs and tests); default: all")
    g.add_argument("--seed", type=int, default=0, help="seed of the data split and of training")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=("auto", *KINDS), default="auto",
                   help="model kind (docs/model_kinds.md); auto: patchcore on a CPU-only machine, "
                        "efficientad where CUDA is available")
    p.add_argument("--size", default="s", help="model size: efficientad s|m, others s")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="model option passed to create_model (YAML value), repeatable: e.g. alpha=0.5, "
                        "taps=[2,4,8]; default: none (docs/model_kinds.md lists them)")
    p.add_argument("--tile", type=positive_int, default=256, help="square tile size in pixels")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frr", type=fraction, default=0.01, help="target false-reject rate on good images")
    p.add_argument("--pixel-frr", type=fraction, default=1e-4,
                   help="false-positive rate of good pixels for the segmentation threshold")
    p.add_argument("--batch-size-eval", type=positive_int, default=8, help="images per evaluation batch")


def build_parser() -> Parser:
    parser = Parser(prog="edge-train", description="Train, evaluate and export anomaly models.")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train, calibrate, evaluate and export a bundle",
                       description="Train on good images, calibrate map normalisation and thresholds on "
                                   "held-out good images, evaluate when test data exist, export the bundle "
                                   "to --out (model.onnx, core.pt2, bundle.json, config.json, metrics.json, "
                                   "report.png, checkpoint.pt, train.yaml).")
    p.add_argument("--config", metavar="YAML",
                   help="read the options from this YAML file (keys: the option names, e.g. kind: dfr); "
                        "options given here override it; default: none")
    _add_data(p)
    _add_model(p)
    _add_calibration(p)
    p.add_argument("--steps", type=_steps, default="auto",
                   help="training steps, or auto: as many as fit --time-budget, stopping early when the loss "
                        "on the held-out good images stops improving")
    p.add_argument("--time-budget", type=positive_float, metavar="MIN",
                   help="minutes for training with --steps auto; default: 10 on CPU, 30 with CUDA")
    p.add_argument("--batch-size", type=positive_int, default=1, help="training batch size")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="learning rate")
    p.add_argument("--teacher", default="shipped", metavar="shipped|none|FILE",
                   help="EfficientAD teacher: shipped (the package's, docs/teacher.md), a file from "
                        "pretrain-teacher, or none (needs --teacher-steps)")
    p.add_argument("--teacher-steps", type=non_negative_int, default=0,
                   help="EfficientAD: distil the teacher on the training images for this many steps first, "
                        "from --teacher's weights (from scratch with none)")
    p.add_argument("--synthetic-anomalies", action="store_true", help="noise patches as negative examples")
    p.add_argument("--cdo", action="store_true", help="collaborative discrepancy optimisation loss")
    p.add_argument("--crossfit", type=int, default=None, metavar="K",
                   help="calibrate on K-fold cross-fitted training images too (default: 5 for kinds that fit "
                        "in seconds, i.e. patchcore; 0 for the others; 0 switches it off)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="steps between checkpoints (0: at the end)")
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx, calibrated on the training images (docs/engines.md)")
    p.add_argument("--out", required=True, metavar="DIR", help="output bundle folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain-teacher", help="distil the EfficientAD teacher on any image folders",
                       description="Distil EfficientNet-Lite0 features into an EfficientAD teacher PDN on "
                                   "the images of one or more folders; `train --teacher CKPT` loads it.")
    p.add_argument("--images", action="append", required=True, metavar="DIR", help="image folder, repeatable")
    p.add_argument("--size", default="s", choices=("s", "m"), help="EfficientAD size")
    p.add_argument("--tile", type=positive_int, default=64,
                   help="PDN crop size (Lite0 sees 32 px more context on each side)")
    p.add_argument("--steps", type=positive_int, default=1000, help="distillation steps")
    p.add_argument("--batch-size", type=positive_int, default=8, help="batch size")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="learning rate")
    p.add_argument("--limit", type=positive_int, help="at most this many images per folder; default: all")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--out", required=True, metavar="CKPT", help="teacher checkpoint file to write")
    p.set_defaults(func=cmd_pretrain_teacher)

    p = sub.add_parser("calibrate", help="re-set a bundle's thresholds from images collected later",
                       description="Score folders of good (and optionally defective) images exactly as "
                                   "the daemon does, set the image and region thresholds at the target "
                                   "false-reject rate (trainer/calibrate.py: a tail estimate when the images "
                                   "are too few), write them into bundle.json and a calibration report "
                                   "(PNG). No retraining.")
    p.add_argument("--bundle", required=True, metavar="DIR",
                   help="bundle folder to re-calibrate (bundle.json is edited in place)")
    p.add_argument("--good", required=True, metavar="DIR",
                   help="folder of good images (png/jpg/bmp/tif), frames as the camera delivers them")
    p.add_argument("--defective", metavar="DIR",
                   help="folder of defective images: measured miss rate and the report's second histogram")
    p.add_argument("--frr", type=float, default=0.01, help="target false-reject rate on good images (0.01)")
    p.add_argument("--pixel-frr", type=float, default=1e-4,
                   help="false-positive rate of good pixels for the region threshold (1e-4)")
    p.add_argument("--report", metavar="PNG", help="calibration report path (default BUNDLE/calibration.png)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--dry-run", action="store_true",
                   help="write the report only; leave bundle.json unchanged")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("evaluate", help="metrics of a bundle or a training checkpoint on a dataset",
                       description="A bundle runs through ONNX Runtime on overlapping tiles with its own "
                                   "thresholds; a checkpoint is re-calibrated on the validation split (of a "
                                   "labelled --folder: --val-fraction of good/, default 0.1).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", metavar="DIR", help="bundle folder")
    src.add_argument("--checkpoint", metavar="CKPT", help="training checkpoint (checkpoint.pt)")
    _add_data(p, folder_help=LABELLED_HELP)
    _add_model(p)
    _add_calibration(p)
    p.add_argument("--out", metavar="DIR", help="write metrics.json and report.png here; default: print only")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a training checkpoint as a bundle",
                       description="Load a checkpoint, calibrate on the dataset's validation split, evaluate "
                                   "when test data exist, and write the bundle.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="training checkpoint (checkpoint.pt)")
    _add_data(p)
    _add_model(p)
    _add_calibration(p)
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx, calibrated on the training images (docs/engines.md)")
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


def _steps(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        steps = int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or auto, got {value!r}") from None
    if steps < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or auto, got {steps}")
    return steps


def default_time_budget() -> float:
    """Minutes of training with --steps auto: 10 on CPU; 30 where CUDA is present (a bigger machine)."""
    import torch

    return 30.0 if torch.cuda.is_available() else 10.0


def _number(value):
    """YAML 1.1 reads 1e-3 as a string: numbers in exponent form become floats."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        parsed = _number(yaml.safe_load(value))
        if isinstance(parsed, str) and "," in parsed:  # taps=8,16 as documented: a list of numbers
            parts = [_number(yaml.safe_load(p)) for p in parsed.split(",")]
            if all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts):
                parsed = parts
        options[key.replace("-", "_")] = parsed
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def resolve_kind(kind: str) -> str:
    """``auto``: PatchCore (no gradient training: minutes on a CPU) unless CUDA is available (EfficientAD)."""
    if kind != "auto":
        return kind
    import torch

    return "efficientad" if torch.cuda.is_available() else "patchcore"


def build_model(kind: str, size: str, tile: int, options: dict):
    from .models import create_model

    kind = resolve_kind(kind)

    extra = {"tile": tile} if kind == "efficientad" else {}
    try:
        return create_model(kind, size, **{**extra, **options})
    except TypeError as exc:  # an --option the model does not take
        names = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "none"
        raise UsageError(f"--option ({names}) is not accepted by {kind}-{size}: {exc}; the options of each "
                         f"kind are in docs/model_kinds.md and docs/trainer.md") from exc


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
            budget = info.get("budget_s")
            desc = f"{phase} (budget {budget / 60:.0f} min)" if budget else phase
            self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
            self.phase, self.last = phase, 0
        if total != self.bar.total:
            self.bar.total = total  # --steps auto: the step count follows the measured rate
        self.bar.update(step - self.last)
        self.last = step
        post = {k: f"{v:.4g}" for k, v in info.items() if isinstance(v, float) and not k.endswith("_s")}
        if info.get("budget_s"):
            left = max(0.0, info["budget_s"] - info["elapsed_s"])
            post["budget left"] = f"{int(left // 60)}:{int(left % 60):02d}"
        self.bar.set_postfix(post)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def choose_teacher(model, args) -> dict:
    """EfficientAD: load the teacher named by --teacher (shipped, none or a file). Returns what was loaded."""
    from .teacher import load_shipped_teacher, load_teacher

    if getattr(model, "kind", None) != "efficientad":
        return {}
    if args.teacher == "none":
        if args.teacher_steps <= 0:
            raise UsageError("--teacher none needs --teacher-steps > 0 (an untrained teacher finds nothing)")
        return {"teacher": "none"}
    if args.teacher == "shipped":
        return {"teacher": "shipped", **load_shipped_teacher(model)}
    load_teacher(model, args.teacher)
    return {"teacher": str(args.teacher)}


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

def _warn(message: str) -> None:
    print(f"edge-train: warning: {message}", file=sys.stderr)


def calibrate_model(model, splits, tile: int, frr: float, pixel_frr: float, batch_size: int = 8,
                    refit=None, folds: int = 0, scoring=None):
    """(MapSpec, Calibration) from good images the model never trained on: the validation split, plus, with
    ``refit`` and ``folds`` >= 2, every training image scored by a model refitted without its fold. Images are
    scored with ``scoring`` (an InspectConfig; default trainer.scoring.scoring_config), which bundle.json
    records for the daemon."""
    from .calibrate import calibrate, map_spec_from_raw
    from .crossfit import crossfit_scored
    from .evaluate import model_scored, raw_maps
    from .scoring import scoring_config, scoring_record

    raw = raw_maps(model, splits.val, batch_size)
    spec = map_spec_from_raw(raw, model.map_weights, tile, stride=model.map_stride)
    scoring = scoring or scoring_config(tile, spec.stride)
    val = model_scored(model, splits.val, splits.channels, tile, spec, scoring, batch_size=batch_size)
    scores, maps = [val.scores], list(val.maps)
    source = f"validation split ({len(splits.val)} images)"
    if refit is not None and folds >= 2:  # fewer than 2 training images: nothing to cross-fit
        cross = crossfit_scored(refit, splits.train, folds, splits.channels, tile, spec, batch_size,
                                config=scoring)
        scores.append(cross.scores)
        maps.extend(cross.maps)
        source += f" + {folds}-fold cross-fitted training images ({len(splits.train)})"
    calibration = calibrate(np.concatenate(scores), maps, frr, pixel_frr, source=source,
                            scoring=scoring_record(scoring))
    if calibration.image.warning:
        _warn(calibration.image.warning)
    return spec, calibration


def evaluate_and_report(scored, test, thresholds, out_dir: Path | None, title: str) -> dict:
    """Metrics of the daemon's scores/maps of the test images; with out_dir, report.png."""
    from .evaluate import evaluate_scored
    from .metrics import roc_curve
    from .report import pick_panels, write_report

    result = evaluate_scored(scored, test, thresholds)
    if out_dir is not None:
        main = ~np.isin(np.array(test.groups), test.separate_groups)
        fpr, tpr, _ = roc_curve(result.scores[main], test.labels[main])
        panels = pick_panels(test.images, result.maps, result.scores, test.labels, test.names, test.masks)
        write_report(out_dir / "report.png", {"image": (fpr, tpr, result.metrics["image_auroc"])}, panels,
                     title=title, vmax=max(thresholds.image * 2, 1e-6) if thresholds else None)
    return result.metrics


def _finish(model, splits, args, out: Path, tile: int, options: dict, training: dict, refit=None) -> dict:
    from .evaluate import model_scored
    from .export import export_model

    out.mkdir(parents=True, exist_ok=True)
    folds = min(_crossfit_folds(args, model, splits), len(splits.train))
    spec, calibration = calibrate_model(model, splits, tile, args.frr, args.pixel_frr, args.batch_size_eval,
                                        refit=refit, folds=folds)
    if getattr(model, "feature_cache", None) is not None:
        model.feature_cache = None  # the refits are done: free the cached training features
    thresholds = calibration.thresholds
    metrics: dict = {"thresholds": asdict(thresholds), "calibration": calibration.to_dict()}
    title = f"{model.kind}-{model.size} on {splits.name}"
    if splits.test is not None:
        scored = model_scored(model, splits.test.images, splits.channels, tile, spec,
                              batch_size=args.batch_size_eval)
        metrics.update(evaluate_and_report(scored, splits.test, thresholds, out, title))
    else:
        from .report import Panel, write_report

        val = model_scored(model, splits.val, splits.channels, tile, spec, batch_size=args.batch_size_eval)
        panels = [Panel(im, m, f"validation {i}: {s:.3f}")
                  for i, (im, m, s) in enumerate(zip(splits.val, val.maps, val.scores, strict=True))][:8]
        write_report(out / "report.png", {}, panels, title=title + " (validation, no test set)")
    config = {"model": {"kind": model.kind, "size": model.size, "options": options, "tile": tile},
              "data": splits.info, "args": {k: v for k, v in vars(args).items() if k != "func"}}
    export_model(model, out, tile=tile, channels=splits.channels, map_spec=spec, thresholds=thresholds,
                 training_summary=training, metrics=metrics, config=config,
                 calibration=calibration.to_dict(), int8_images=splits.train if args.int8 else None)
    return metrics


def _crossfit_folds(args, model, splits) -> int:
    """--crossfit K, or by default 5 for kinds that fit in seconds (no gradient training), else 0; never by
    default over training images that share pixels (overlapping crops: a fold would be scored by a model
    fitted on its neighbours, in sample)."""
    folds = getattr(args, "crossfit", None)
    if folds is None:
        if splits.info.get("train_crops_overlap"):
            return 0
        return 5 if getattr(model, "fits_without_training", False) else 0
    if folds >= 2 and splits.info.get("train_crops_overlap"):
        _warn(f"--crossfit {folds} over training images that overlap one another (manifest.json): their "
              "scores are in sample and the threshold will be too low")
    return int(folds)


def train_config(args, out: Path):
    """TrainConfig from the `train` arguments (--steps auto: a time budget, 70000 steps at most)."""
    from .fit import TrainConfig

    auto = args.steps == "auto"
    budget = args.time_budget if args.time_budget is not None else default_time_budget()
    if auto and budget <= 0:
        raise UsageError(f"--time-budget must be > 0 minutes, got {budget}")
    return TrainConfig(steps=70_000 if auto else args.steps, time_budget=60.0 * budget if auto else 0.0,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       teacher_steps=args.teacher_steps,
                       synthetic_anomalies=args.synthetic_anomalies, cdo=args.cdo,
                       checkpoint_path=str(out / "checkpoint.pt"), checkpoint_every=args.checkpoint_every,
                       resume=args.resume, tile=args.tile)


def train_bundle(args, progress: bool = True, stop=None) -> dict:
    """The `train` command as a function: returns the metrics dict (also written to --out/metrics.json).
    ``stop()`` -> True ends training early (see trainer.interrupt); the bundle is still calibrated and
    written, and metrics["training"]["stopped"] says why training ended."""
    from .data.images import check_tile
    from .fit import fit

    out = Path(args.out)
    config = train_config(args, out)
    splits = load_data(args)
    check_tile(splits.train, args.tile)
    options = parse_options(args.option)
    args.kind = resolve_kind(args.kind)  # recorded in config.json as the kind that ran
    model = build_model(args.kind, args.size, args.tile, options)
    teacher = choose_teacher(model, args)
    out.mkdir(parents=True, exist_ok=True)
    bar = ProgressBar(progress)
    if hasattr(model, "feature_cache"):  # PatchCore: the cross-fitted refits reuse the backbone's features
        model.feature_cache = {}
    try:
        history = fit(model, splits.train, config, progress=bar, val_images=splits.val, stop=stop)
    finally:
        bar.close()

    def refit(images):  # a fresh model fitted like this one (cross-fitted calibration of fast kinds)
        fresh = build_model(args.kind, args.size, args.tile, options)
        if hasattr(fresh, "feature_cache"):
            fresh.feature_cache = model.feature_cache
        fit(fresh, images, replace(config, checkpoint_path=None, resume=False, checkpoint_every=0))
        return fresh.eval()

    loss = history.get("loss", [])
    training = {"steps": history.get("steps"), "seconds": round(float(history.get("seconds", 0.0)), 2),
                "final_loss": float(np.mean(loss[-10:])) if loss else None, "teacher": teacher or None,
                "stopped": history.get("stopped"), "time_budget_s": config.time_budget or None,
                "validation": history.get("validation"),
                "n_train": len(splits.train), "n_val": len(splits.val), "latent": history.get("latent")}
    try:
        metrics = _finish(model, splits, args, out, args.tile, options, training, refit=refit)
    finally:
        if hasattr(model, "feature_cache"):
            model.feature_cache = None
    metrics["training"] = training
    return metrics


# ---------------------------------------------------------------- commands

def _print_metrics(metrics: dict, out: str) -> None:
    headline = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    if headline:
        print(json.dumps(headline, indent=2))
    else:
        print("no test set, so no metrics: evaluate the bundle on labelled images with `edge-train evaluate "
              f"--bundle {out} --folder DIR` (DIR holds good/ and one folder per defect type)")
    print(f"bundle written to {out} (report: {Path(out) / 'report.png'})")


def cmd_train(args) -> int:
    from .interrupt import GracefulStop

    with GracefulStop() as stop:
        metrics = train_bundle(args, stop=stop)
    write_train_yaml(args, Path(args.out) / TRAIN_YAML)
    _print_metrics(metrics, args.out)
    if stop():
        print(f"edge-train train: interrupted after {metrics['training']['steps']} steps: the bundle holds "
              f"what was learnt so far; --resume continues the checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def cmd_pretrain_teacher(args) -> int:
    from .data.images import check_tile, read_images, to_channels
    from .models.backbones.torchvision_ import IMAGENET_MEAN, IMAGENET_STD
    from .models.efficientad import PDN_BUILDERS, TEACHER_CHANNELS
    from .teacher import DistillConfig, distill_teacher, save_teacher

    if args.size not in PDN_BUILDERS:
        raise UsageError(f"unknown EfficientAD size {args.size!r}: valid are {sorted(PDN_BUILDERS)}")
    images = []
    for folder in args.images:
        found, paths = read_images(folder, limit=args.limit, seed=args.seed)
        check_tile(found, args.tile, paths)
        images.extend(to_channels(im, 3) for im in found)
    teacher = PDN_BUILDERS[args.size](TEACHER_CHANNELS)
    config = DistillConfig(crop=args.tile, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           seed=args.seed)
    bar = ProgressBar()
    try:
        summary = distill_teacher(teacher, images, config, IMAGENET_MEAN, IMAGENET_STD, progress=bar)
    finally:
        bar.close()
    loss = summary.get("loss", [])
    info = {"images": len(images), "steps": args.steps, "crop": args.tile, "batch_size": args.batch_size,
            "final_loss": float(np.mean(loss[-10:])) if loss else None}
    save_teacher(args.out, teacher, args.size, info)
    print(f"teacher checkpoint written to {args.out} ({len(images)} images, {args.steps} steps, "
          f"final loss {np.mean(loss[-10:]) if loss else float('nan'):.4g})")
    return 0


def cmd_calibrate(args) -> int:
    from engines.bundle import read_bundle

    from .calibrate import calibrate
    from .calibration_report import write_calibration_report
    from .data.images import read_images
    from .evaluate import bundle_scored
    from .export import rewrite_thresholds
    from .scoring import scoring_record

    meta = read_bundle(args.bundle)
    channels = meta.input.channels
    good, _ = read_images(args.good, channels)
    bad = read_images(args.defective, channels)[0] if args.defective else []
    good_scored = bundle_scored(args.bundle, good, threads=args.threads)
    bad_scores = bundle_scored(args.bundle, bad, threads=args.threads).scores if bad else None
    calibration = calibrate(good_scored.scores, good_scored.maps, args.frr, args.pixel_frr,
                            source=f"edge-train calibrate: {len(good)} good images from {args.good}",
                            defective_scores=bad_scores, scoring=scoring_record(good_scored.config))
    if calibration.image.warning:
        _warn(calibration.image.warning)
    report = Path(args.report) if args.report else Path(args.bundle) / "calibration.png"
    write_calibration_report(report, good_scored.scores, bad_scores, calibration,
                             title=f"{meta.model_id}: {Path(args.good).name}")
    t = calibration.thresholds
    frr, lo, hi = calibration.observed_frr
    print(f"image threshold {meta.image_threshold:.5g} -> {t.image:.5g} ({calibration.image.estimator}, "
          f"{len(good)} good images); region threshold {meta.pixel_threshold:.5g} -> {t.pixel:.5g}")
    print(f"false-reject rate on these good images {frr:.3f} (95 % {lo:.3f}-{hi:.3f})")
    if calibration.observed_miss is not None:
        miss, lo, hi = calibration.observed_miss
        print(f"miss rate on {len(bad)} defective images {miss:.3f} (95 % {lo:.3f}-{hi:.3f})")
    if args.dry_run:
        print(f"dry run: bundle.json unchanged; report {report}")
    else:
        rewrite_thresholds(args.bundle, calibration)
        print(f"thresholds written to {Path(args.bundle) / 'bundle.json'}; report {report}")
    return 0


def _evaluation_data(args):
    """DataSplits to evaluate on; --folder is a labelled folder here (good/ + defect folders)."""
    if not args.folder:
        return load_data(args)
    from .data.labelled import load_labelled_folder

    val_fraction = 0.0 if args.bundle else (args.val_fraction or 0.1)
    return load_labelled_folder(args.folder, val_fraction, args.seed, args.resize)


def cmd_evaluate(args) -> int:
    splits = _evaluation_data(args)
    if splits.test is None:
        raise UsageError(f"{splits.name} has no labelled test images to evaluate on")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if args.bundle:
        from engines.bundle import read_bundle

        from .calibrate import Thresholds
        from .evaluate import bundle_scored

        meta = read_bundle(args.bundle)
        if meta.input.channels != splits.channels:
            raise UsageError(f"bundle expects {meta.input.channels}-channel images, the dataset has "
                             f"{splits.channels}")
        thresholds = Thresholds(meta.image_threshold, meta.pixel_threshold, meta.target_false_reject_rate)
        scored = bundle_scored(args.bundle, splits.test.images, batch_size=args.batch_size_eval)
        metrics = evaluate_and_report(scored, splits.test, thresholds, out,
                                      f"{meta.model_id} on {splits.name}")
    else:
        from .evaluate import model_scored

        model, tile, _ = _model_from_checkpoint(args)
        spec, calibration = calibrate_model(model, splits, tile, args.frr, args.pixel_frr,
                                            args.batch_size_eval)
        scored = model_scored(model, splits.test.images, splits.channels, tile, spec,
                              batch_size=args.batch_size_eval)
        metrics = evaluate_and_report(scored, splits.test, calibration.thresholds, out,
                                      f"{model.kind}-{model.size}")
        metrics["thresholds"] = asdict(calibration.thresholds)
        metrics["calibration"] = calibration.to_dict()
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
    _print_metrics(metrics, args.out)
    return 0


# ---------------------------------------------------------------- train --config, quick mode, main

TRAIN_YAML = "train.yaml"
NOT_IN_CONFIG = ("config", "func", "command", "help", "version")


def _train_actions() -> dict[str, argparse.Action]:
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    return {a.dest: a for a in train._actions if a.option_strings and a.dest not in NOT_IN_CONFIG}


def _option_items(path, key, value) -> list[str]:
    """`option:` as a mapping {alpha: 0.5} or a list of KEY=VALUE strings -> KEY=VALUE tokens."""
    if isinstance(value, dict):
        return [f"{k}={json.dumps(v)}" for k, v in value.items()]
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise UsageError(f"{path}: {key}: must be a mapping (alpha: 0.5) or a list of KEY=VALUE, "
                             f"got {item!r}")
    return items


def _config_value(path, key, action: argparse.Action, value) -> list[str]:
    """One config entry as command-line tokens, checked the way the option checks its value."""
    opt = action.option_strings[-1]
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UsageError(f"{path}: {key}: must be true or false, got {value!r}")
        return [opt] if value else []
    if isinstance(action, argparse._AppendAction):
        return [t for item in _option_items(path, key, value) for t in (opt, item)]
    if value is None:
        return []
    if isinstance(value, (dict, list, bool)):
        raise UsageError(f"{path}: {key}: must be a single value, got {value!r}")
    text = str(value)
    try:
        converted = action.type(text) if action.type else text
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise UsageError(f"{path}: {key}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        raise UsageError(f"{path}: {key}: must be one of {', '.join(map(str, action.choices))}, "
                         f"got {value!r}")
    return [opt, text]


def config_tokens(path: str | Path) -> list[str]:
    """`train --config FILE`: the YAML mapping as `train` options; UsageError naming the key at fault."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config: file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: must be a mapping of option names to values (e.g. kind: dfr), "
                         f"got {type(data).__name__}")
    actions = _train_actions()
    actions["options"] = actions["option"]
    tokens: list[str] = []
    for key, value in data.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            known = ", ".join(sorted(k for k in actions if k != "options"))
            raise UsageError(f"{path}: {key}: unknown key (the keys are the options of `edge-train train`: "
                             f"{known})")
        tokens += _config_value(path, key, action, value)
    return tokens


def _expand_config(argv: list[str]) -> list[str]:
    """argv of `train --config FILE ...` with the file's options placed first (the command line wins)."""
    if not argv or argv[0] != "train":
        return argv
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return ["train", *config_tokens(argv[i + 1]), *argv[1:]]
        if token.startswith("--config="):
            return ["train", *config_tokens(token.split("=", 1)[1]), *argv[1:]]
    return argv


def write_train_yaml(args, path: Path) -> None:
    """The settings of this training as a `--config` file (every option with its value)."""
    values = {}
    for dest, action in _train_actions().items():
        value = getattr(args, dest, None)
        if value is None or value is False or value == [] or dest in ("resume", "out"):
            continue  # no --out: training again must not overwrite this bundle unasked
        if isinstance(action, argparse._AppendAction):
            value = {k: list(v) if isinstance(v, tuple) else v for k, v in parse_options(value).items()}
        values[dest] = value
    header = ("# written by edge-train train: the settings of this bundle; edge-train train --config "
              f"{path} --out DIR trains it again\n")
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))


QUICK_STEPS, QUICK_LIMIT, QUICK_TILE, QUICK_RESIZE = 20, 40, 64, 128


def _apply_quick(args) -> None:
    """EDGE_INSPECT_QUICK=1 (README, CI): few steps, images and pixels, said on stderr."""
    if not quick_mode() or args.command not in ("train", "pretrain-teacher", "evaluate", "export"):
        return
    changed = []
    caps = [("steps", QUICK_STEPS), ("teacher_steps", QUICK_STEPS), ("limit", QUICK_LIMIT),
            ("resize", QUICK_RESIZE)]
    if args.command in ("train", "pretrain-teacher"):
        caps.append(("tile", QUICK_TILE))
    for name, cap in caps:
        value = getattr(args, name, None)
        if name == "limit" and args.command in ("evaluate", "export") and not args.elpv:
            continue  # a labelled folder or MVTec is evaluated whole
        if hasattr(args, name) and (value is None or value == "auto" or value > cap):
            setattr(args, name, cap)
            changed.append(f"--{name.replace('_', '-')} {cap}")
    if changed:
        quick_note(f"edge-train {args.command}", "quick run: " + ", ".join(changed))


def _fixes() -> dict:
    from engines.bundle import BundleError

    from .data.images import DataError
    from .fit import CheckpointError

    return {DataError: "check the path and the images (`edge-train COMMAND --help` says what each dataset "
                       "option accepts)",
            CheckpointError: "give a checkpoint.pt written by `edge-train train` (a teacher: by "
                             "`edge-train pretrain-teacher`)",
            BundleError: "give a bundle folder written by `edge-train train` or `edge-train export`",
            UsageError: "see `edge-train COMMAND --help`"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _expand_config(argv)
    except UsageError as exc:
        print(f"edge-train train: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    args = build_parser().parse_args(argv)
    _apply_quick(args)
    started = time.perf_counter()
    code = run_cli(f"edge-train {args.command}", lambda: args.func(args), fixes=_fixes(),
                   interrupted="interrupted (a checkpoint is written every --checkpoint-every steps; "
                               "train again with --resume to continue from it)"
                   if args.command == "train" else "interrupted")
    if code == 0:
        print(f"done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
