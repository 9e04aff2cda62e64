"""The demo's model: DFR on the EfficientNet-Lite0 backbone, trained on modules of good ELPV cells, exported
as a bundle and cached by its training settings.

Recipe (chosen by measurement on the 2-core CPU, see docs/demo.md):
  - DFR with backbone taps at strides 2, 4, 8, 16 resized to a stride-4 grid (``grid_stride=4``) and
    smoothed by a 3 x 3 mean (``kernel=3, stride=1, reflect_pad=1``): the regional features of the paper at
    a quarter of the cost of its full-resolution grid (``grid_stride=1``);
  - training crops of ``crop`` pixels from modules of good training cells (so the model sees the dark
    joints between cells), Adam at ``lr`` for ``steps`` steps;
  - map normalisation and the pixel threshold from the good validation cells (trainer.calibrate);
  - ``joint_margin`` pixels on each side of every cell edge are ignore zones (modules.joint_zones): on the
    held-out mono cells this raised the cell AUROC of a 300-step model from 0.67 (whole cell) to 0.89
    (docs/demo.md): good cells differ most at their chamfered corners and dark edges;
  - the image threshold for whole modules measured the way the daemon scores them: the exported engine
    runs ``edge_daemon.pipeline.inspect_frame`` (same tiling, overlap and ignore zones) over modules of good
    validation cells, and the threshold is the (1 - frr) quantile of their scores times
    ``threshold_margin``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .modules import ModuleLayout, good_modules, joint_zones

__all__ = ["TrainSettings", "QUICK", "DemoModel", "load_cells", "train_demo_model", "cached_model",
           "module_threshold"]

RECIPE_VERSION = 2
DEMO_FILE = "demo.json"


@dataclass(frozen=True)
class TrainSettings:
    """Everything that changes the trained bundle; its hash is the cache key."""

    cell_type: str = "mono"
    seed: int = 0
    limit: int | None = None  # ELPV cells of that type loaded (None: all)
    steps: int = 300
    batch_size: int = 4
    crop: int = 128
    tile: int = 256  # bundle tile (the daemon tiles frames with it)
    lr: float = 1e-3
    taps: tuple[int, ...] = (2, 4, 8, 16)
    rows: int = 3
    cols: int = 4
    frr: float = 0.01
    pixel_frr: float = 1e-4
    calib_modules: int = 24
    threshold_margin: float = 1.0
    tile_overlap: int = 16
    joint_margin: int = 32  # pixels ignored on each side of every cell edge

    def __post_init__(self):
        checks = [(self.cell_type in ("mono", "poly"), "cell_type must be mono or poly"),
                  (self.steps >= 1, "steps must be >= 1"),
                  (self.batch_size >= 1, "batch_size must be >= 1"),
                  (32 <= self.crop <= 300, "crop must be in 32..300"),
                  (self.tile >= 32 and self.tile % 4 == 0, "tile must be a multiple of 4, >= 32"),
                  (self.calib_modules >= 1, "calib_modules must be >= 1"),
                  (0 < self.frr < 1, "frr must be in (0, 1)"),
                  (self.threshold_margin > 0, "threshold_margin must be > 0"),
                  (0 <= 2 * self.joint_margin < 300, "joint_margin must be in 0..149")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainSettings: {msg}")

    @property
    def layout(self) -> ModuleLayout:
        return ModuleLayout(self.rows, self.cols)

    @property
    def ignore_zones(self) -> list[tuple[int, int, int, int]]:
        return joint_zones(self.layout, self.joint_margin)

    def inspect_mapping(self) -> dict:
        """The daemon's inspection settings for the demo camera (without the threshold)."""
        return {"tile_overlap": self.tile_overlap, "ignore_zones": [list(z) for z in self.ignore_zones]}

    def key(self) -> str:
        blob = json.dumps({"recipe": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# tiny settings for the end-to-end test: seconds, not a useful detector
QUICK = TrainSettings(limit=60, steps=3, batch_size=2, crop=64, tile=64, taps=(2, 4), rows=1, cols=2,
                      calib_modules=2)


@dataclass(frozen=True)
class DemoModel:
    bundle: Path
    image_threshold: float  # module-level threshold for the daemon (inspection.image_threshold)
    info: dict  # training summary, written to demo.json


def load_cells(settings: TrainSettings):
    """The seeded ELPV split of ``settings.cell_type`` (trainer.data.elpv.load_elpv)."""
    from trainer.data.elpv import load_elpv

    return load_elpv(settings.cell_type, seed=settings.seed, limit=settings.limit)


def module_threshold(bundle: Path, modules: list[np.ndarray], settings: TrainSettings,
                     threads: int) -> tuple[float, list[float]]:
    """Score good modules exactly as the daemon does; threshold = quantile(1 - frr) * margin."""
    from edge_daemon.pipeline import InspectConfig, inspect_frame
    from engines.registry import open_engine

    engine = open_engine(bundle, backend="onnxruntime", max_batch=8, threads=threads)
    try:
        config = InspectConfig.from_mapping(settings.inspect_mapping(), "demo")
        scores = [float(inspect_frame(engine, m, config).score) for m in modules]
    finally:
        engine.close()
    return float(np.quantile(scores, 1.0 - settings.frr)) * settings.threshold_margin, scores


def train_demo_model(settings: TrainSettings, out_dir: Path, splits=None, threads: int = 2,
                     say=print) -> DemoModel:
    """Train, calibrate and export into ``out_dir/bundle``; write ``out_dir/demo.json``."""
    import torch

    from trainer.cli import calibrate_model
    from trainer.export import export_model
    from trainer.fit import TrainConfig, fit
    from trainer.models import create_model

    torch.set_num_threads(threads)
    splits = splits if splits is not None else load_cells(settings)
    layout = settings.layout
    started = time.perf_counter()
    train_mods = good_modules(splits.train, layout, max(1, len(splits.train) // layout.cells), settings.seed)
    model = create_model("dfr", "s", taps=settings.taps, grid_stride=4, stride=1, kernel=3, reflect_pad=1)
    config = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                         seed=settings.seed, tile=settings.crop, progress_every=max(1, settings.steps // 10))

    def progress(step, total, info):
        say(f"  train step {step}/{total}  loss {info.get('loss', float('nan')):.4g}  "
            f"{time.perf_counter() - started:.0f} s")

    history = fit(model, train_mods, config, progress=progress)
    say(f"  calibrating on {len(splits.val)} good validation cells")
    spec, thresholds, _ = calibrate_model(model, splits.val, settings.tile, settings.frr, settings.pixel_frr,
                                          batch_size=8)
    bundle = out_dir / "bundle"
    training = {"steps": settings.steps, "seconds": round(float(history["seconds"]), 1),
                "latent": history.get("latent"), "n_train_cells": len(splits.train),
                "n_train_modules": len(train_mods), "n_val_cells": len(splits.val)}
    say("  exporting the bundle (ONNX + torch.export)")
    export_model(model, bundle, tile=settings.tile, channels=1, map_spec=spec, thresholds=thresholds,
                 training_summary=training, metrics={"thresholds": asdict(thresholds)},
                 config={"demo": asdict(settings)})
    cal = good_modules(splits.val, layout, settings.calib_modules, settings.seed + 1)
    say(f"  measuring the module threshold on {len(cal)} modules of good validation cells")
    threshold, scores = module_threshold(bundle, cal, settings, threads)
    info = {"settings": asdict(settings), "key": settings.key(), "training": training,
            "cell_threshold": thresholds.image, "image_threshold": threshold,
            "calibration_scores": [round(s, 5) for s in scores],
            "seconds": round(time.perf_counter() - started, 1)}
    (out_dir / DEMO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return DemoModel(bundle, threshold, info)


def cached_model(out_dir: Path) -> DemoModel | None:
    """The model trained earlier into ``out_dir`` when it is complete and verifies; else None."""
    from engines.bundle import BundleError, read_bundle

    path = out_dir / DEMO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        read_bundle(out_dir / "bundle")
        return DemoModel(out_dir / "bundle", float(info["image_threshold"]), info)
    except (OSError, ValueError, KeyError, BundleError):
        return None
