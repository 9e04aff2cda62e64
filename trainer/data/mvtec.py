"""MVTec-AD layout: <root>/<category>/{train/good, test/<type>, ground_truth/<type>/<name>_mask.png}."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import GOOD, DataSplits, EvalSet, split_good
from .images import DataError, read_images, read_mask, resize

__all__ = ["load_mvtec"]


def _mask_for(cat: Path, group: str, image_path: Path, shape: tuple[int, int]) -> np.ndarray:
    if group == GOOD:
        return np.zeros(shape, bool)
    path = cat / "ground_truth" / group / f"{image_path.stem}_mask.png"
    if not path.is_file():
        raise DataError(f"ground-truth mask {path} is missing for {image_path}", path)
    return read_mask(path, shape)


def _load_test(cat: Path, channels: int, resize_to: int | None) -> EvalSet:
    test_dir = cat / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir} does not exist (MVTec layout: test/<defect type>/*.png)", test_dir)
    images, masks, labels, groups, names = [], [], [], [], []
    for group_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        group_images, paths = read_images(group_dir, channels)
        for image, path in zip(group_images, paths, strict=True):
            mask = _mask_for(cat, group_dir.name, path, image.shape[:2])
            if resize_to:
                image = resize(image, resize_to, resize_to)
                mask = resize(mask, resize_to, resize_to, nearest=True)
            images.append(image)
            masks.append(mask)
            labels.append(int(group_dir.name != GOOD))
            groups.append(group_dir.name)
            names.append(f"{group_dir.name}/{path.name}")
    return EvalSet(images=images, labels=np.array(labels), groups=tuple(groups), names=tuple(names),
                   masks=masks)


def load_mvtec(root: str | Path, category: str, channels: int | None = None, val_fraction: float = 0.1,
               seed: int = 0, resize_to: int | None = None, limit: int | None = None) -> DataSplits:
    """Train/validation from train/good (seeded split), test from test/ with masks from ground_truth/."""
    cat = Path(root) / category
    if not cat.is_dir():
        raise DataError(f"MVTec category folder {cat} does not exist", cat)
    good, _ = read_images(cat / "train" / "good", channels, limit=limit, seed=seed)
    if resize_to:
        good = [resize(im, resize_to, resize_to) for im in good]
    channels = good[0].shape[2]
    train, val = split_good(len(good), val_fraction, seed)
    test = _load_test(cat, channels, resize_to) if (cat / "test").exists() else None
    info = {"source": "mvtec", "root": str(root), "category": category, "val_fraction": val_fraction,
            "seed": seed, "resize": resize_to, "n_train": len(train), "n_val": len(val),
            "n_test": 0 if test is None else len(test.images)}
    return DataSplits(name=f"mvtec-{category}", channels=channels, train=[good[i] for i in train],
                      val=[good[i] for i in val], test=test, info=info)
