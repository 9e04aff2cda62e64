"""MVTec-AD layout: <root>/<category>/{train/good, test/<type>, ground_truth/<type>/<name>_mask.png}.

Our one extension: a ``validation/good`` folder, when present, is the validation split (good images the
model never trains on, e.g. crops of a region disjoint from the training crops: trainer/data/textures.py);
otherwise validation is a seeded split of train/good. A ``manifest.json`` with ``"train_crops_overlap":
true`` (training images that share pixels) is passed on in ``info``, so calibration does not cross-fit
over them (a fold's images would be scored by a model fitted on their overlapping neighbours).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import DataSplits, EvalSet, split_good
from .images import DataError, read_images, resize
from .labelled import load_eval_set

__all__ = ["load_mvtec"]


def _load_test(cat: Path, channels: int, resize_to: int | None) -> EvalSet:
    test_dir = cat / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir} does not exist (MVTec layout: test/<defect type>/*.png)", test_dir)
    return load_eval_set(test_dir, cat / "ground_truth", channels, resize_to)


def _read_good(folder: Path, channels: int | None, resize_to: int | None, limit: int | None,
               seed: int) -> list:
    images, _ = read_images(folder, channels, limit=limit, seed=seed)
    return [resize(im, resize_to, resize_to) for im in images] if resize_to else images


def _train_crops_overlap(cat: Path) -> bool | None:
    """manifest.json's ``train_crops_overlap`` (None without a manifest)."""
    manifest = cat / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return bool(json.loads(manifest.read_text()).get("train_crops_overlap"))
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{manifest} is not readable JSON: {exc}", manifest) from exc


def load_mvtec(root: str | Path, category: str, channels: int | None = None, val_fraction: float = 0.1,
               seed: int = 0, resize_to: int | None = None, limit: int | None = None) -> DataSplits:
    """Train/validation from train/good (seeded split) or from train/good and validation/good, test from
    test/ with masks from ground_truth/."""
    cat = Path(root) / category
    if not cat.is_dir():
        raise DataError(f"MVTec category folder {cat} does not exist", cat)
    good = _read_good(cat / "train" / "good", channels, resize_to, limit, seed)
    channels = good[0].shape[2]
    val_dir = cat / "validation" / "good"
    if val_dir.is_dir():
        train_images, val_images = good, _read_good(val_dir, channels, resize_to, limit, seed)
        validation, val_fraction = "validation/good", None
    else:
        train, val = split_good(len(good), val_fraction, seed)
        train_images, val_images = [good[i] for i in train], [good[i] for i in val]
        validation = f"seeded split of train/good ({val_fraction:g})"
    test = _load_test(cat, channels, resize_to) if (cat / "test").exists() else None
    info = {"source": "mvtec", "root": str(root), "category": category, "validation": validation,
            "val_fraction": val_fraction, "seed": seed, "resize": resize_to, "n_train": len(train_images),
            "n_val": len(val_images), "n_test": 0 if test is None else len(test.images)}
    overlap = _train_crops_overlap(cat)
    if overlap is not None:
        info["train_crops_overlap"] = overlap
    return DataSplits(name=f"mvtec-{category}", channels=channels, train=train_images, val=val_images,
                      test=test, info=info)
