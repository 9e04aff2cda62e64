"""The demo's model: PatchCore on the EfficientNet-Lite0 backbone (trainer/models/patchcore.py), a memory bank
of good ELPV cells, exported as a bundle and cached by its settings.

Recipe (docs/demo.md, docs/quality.md):
  - one tile = one cell: the bundle's tile is the cell size (300 px) and the daemon tiles the 3 x 4 cell
    modules with no overlap, so every tile the daemon scores is one whole cell, like the ones in the bank
    (no ignore zones: the cell edges and joints are in the bank);
  - the bank: every patch of the good training cells, greedy coreset of ``bank_fraction``, patch position
    in the feature (``position_weight``: the cells are aligned, a dark corner is normal only in a corner);
  - the threshold: a module is rejected when any of its cells scores above the threshold, so for a target
    share ``module_frr`` of good modules rejected each cell may exceed it with probability
    1 - (1 - module_frr) ** (1 / cells). It is set at that rate on out-of-sample good cells (the validation
    cells and the training cells cross-fitted in ``crossfit`` folds: trainer/crossfit.py), scored exactly as
    the daemon scores them (trainer.scoring), with the tail estimate of trainer/calibrate.py when there are
    too few cells to resolve it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .modules import ModuleLayout

__all__ = ["TrainSettings", "QUICK", "DemoModel", "load_cells", "train_demo_model", "cached_model"]

RECIPE_VERSION = 3
DEMO_FILE = "demo.json"


@dataclass(frozen=True)
class TrainSettings:
    """Everything that changes the trained bundle; its hash is the cache key."""

    cell_type: str = "mono"
    seed: int = 0
    limit: int | None = None  # ELPV cells of that type loaded (None: all)
    tile: int = 300  # the cell size: one tile per cell
    bank_fraction: float = 0.1
    min_bank: int = 1024
    position_weight: float = 1.0
    rows: int = 3
    cols: int = 4
    module_frr: float = 0.05  # target share of good modules rejected
    pixel_frr: float = 1e-4
    crossfit: int = 5

    def __post_init__(self):
        checks = [(self.cell_type in ("mono", "poly"), "cell_type must be mono or poly"),
                  (self.tile >= 32 and self.tile % 4 == 0, "tile must be a multiple of 4, >= 32"),
                  (0 < self.bank_fraction <= 1, "bank_fraction must be in (0, 1]"),
                  (self.min_bank >= 1, "min_bank must be >= 1"),
                  (self.position_weight >= 0, "position_weight must be >= 0"),
                  (0 < self.module_frr < 1, "module_frr must be in (0, 1)"),
                  (0 < self.pixel_frr < 1, "pixel_frr must be in (0, 1)"),
                  (self.crossfit == 0 or self.crossfit >= 2, "crossfit must be 0 or >= 2")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainSettings: {msg}")

    @property
    def layout(self) -> ModuleLayout:
        return ModuleLayout(self.rows, self.cols, cell=self.tile)

    @property
    def tile_overlap(self) -> int:
        return 0  # tiles align with the cells

    @property
    def ignore_zones(self) -> list[tuple[int, int, int, int]]:
        return []

    @property
    def cell_frr(self) -> float:
        """Per-cell false-reject rate that gives ``module_frr`` for a module of independent cells."""
        return 1.0 - (1.0 - self.module_frr) ** (1.0 / self.layout.cells)

    def model_options(self) -> dict:
        return {"bank_fraction": self.bank_fraction, "min_bank": self.min_bank,
                "position_weight": self.position_weight, "seed": self.seed}

    def inspect_mapping(self) -> dict:
        """The daemon's inspection settings for the demo camera (without the threshold)."""
        return {"tile_overlap": self.tile_overlap, "ignore_zones": [list(z) for z in self.ignore_zones]}

    def key(self) -> str:
        blob = json.dumps({"recipe": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# tiny settings for the end-to-end test: seconds, not a useful detector
QUICK = TrainSettings(limit=60, bank_fraction=0.01, min_bank=256, rows=1, cols=2, crossfit=2)


@dataclass(frozen=True)
class DemoModel:
    bundle: Path
    image_threshold: float  # module-level threshold for the daemon (inspection.image_threshold)
    info: dict  # training summary, written to demo.json


def load_cells(settings: TrainSettings):
    """The seeded ELPV split of ``settings.cell_type`` (trainer.data.elpv.load_elpv)."""
    from trainer.data.elpv import load_elpv

    return load_elpv(settings.cell_type, seed=settings.seed, limit=settings.limit)


def _fitted(settings: TrainSettings, images, cache: dict | None = None):
    from trainer.fit import TrainConfig, fit
    from trainer.models import create_model

    model = create_model("patchcore", "s", **settings.model_options())
    model.feature_cache = cache  # shared by the cross-fitted refits: the backbone runs once per cell
    history = fit(model, images, TrainConfig(tile=settings.tile, batch_size=8, seed=settings.seed))
    return model.eval(), history


def train_demo_model(settings: TrainSettings, out_dir: Path, splits=None, threads: int = 2,
                     say=print) -> DemoModel:
    """Fit, calibrate and export into ``out_dir/bundle``; write ``out_dir/demo.json``."""
    import torch

    from inspection.pipeline import InspectConfig
    from trainer.cli import calibrate_model
    from trainer.export import export_model

    torch.set_num_threads(threads)
    splits = splits if splits is not None else load_cells(settings)
    started = time.perf_counter()
    say(f"  memory bank from {len(splits.train)} good training cells")
    cache: dict = {}
    model, history = _fitted(settings, splits.train, cache)
    say(f"  bank of {history['bank']} patches ({history['bank_seconds']:.0f} s); calibrating on "
        f"{len(splits.val)} validation cells + {settings.crossfit}-fold cross-fitted training cells")
    scoring = InspectConfig(tile_overlap=settings.tile_overlap)

    def refit(images):
        return _fitted(settings, images, cache)[0]

    spec, calibration = calibrate_model(model, splits, settings.tile, settings.cell_frr, settings.pixel_frr,
                                        batch_size=8, refit=refit,
                                        folds=settings.crossfit, scoring=scoring)
    model.feature_cache = None
    cache.clear()
    thresholds = calibration.thresholds
    bundle = out_dir / "bundle"
    training = {"kind": "patchcore", "bank": history["bank"], "bank_seconds": history["bank_seconds"],
                "n_train_cells": len(splits.train), "n_val_cells": len(splits.val)}
    say("  exporting the bundle (ONNX + torch.export)")
    export_model(model, bundle, tile=settings.tile, channels=1, map_spec=spec, thresholds=thresholds,
                 training_summary=training, metrics={"thresholds": asdict(thresholds)},
                 config={"demo": asdict(settings)}, calibration=calibration.to_dict())
    info = {"settings": asdict(settings), "key": settings.key(), "training": training,
            "cell_frr": settings.cell_frr, "image_threshold": thresholds.image,
            "calibration": calibration.to_dict(), "seconds": round(time.perf_counter() - started, 1)}
    (out_dir / DEMO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return DemoModel(bundle, thresholds.image, info)


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
