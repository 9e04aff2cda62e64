"""Datasets for training and evaluation: image folders, MVTec-AD layout, ELPV, and a synthetic generator.

Every loader returns a ``DataSplits``: good training images, good validation images (calibration of map
quantiles and thresholds) and, when labels exist, a test ``EvalSet``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import DataError, read_images

__all__ = ["DataError", "DataSplits", "EvalSet", "GOOD", "split_good", "load_folder"]

GOOD = "good"


@dataclass(frozen=True)
class EvalSet:
    """Labelled test images. ``labels`` 1 = defective; ``masks`` bool H x W per image or None (no pixels).

    ``groups`` names each image's defect type (``GOOD`` for good ones). Images whose group is listed in
    ``separate_groups`` stay out of the headline metrics and are reported per group only (ELPV's uncertain
    cells).
    """

    images: list[np.ndarray]
    labels: np.ndarray
    groups: tuple[str, ...]
    names: tuple[str, ...]
    masks: list[np.ndarray] | None = None
    separate_groups: tuple[str, ...] = ()

    def __post_init__(self):
        n = len(self.images)
        if len(self.labels) != n or len(self.groups) != n or len(self.names) != n:
            raise DataError("EvalSet: images, labels, groups and names differ in length")
        if self.masks is not None and len(self.masks) != n:
            raise DataError("EvalSet: one mask per image is required")


@dataclass(frozen=True)
class DataSplits:
    name: str
    channels: int
    train: list[np.ndarray]
    val: list[np.ndarray]
    test: EvalSet | None = None
    info: dict = field(default_factory=dict)  # how the split was made, for config.json


def split_good(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of n good images into (train, val) indices; val has at least two images (one when n < 4),
    train at least one."""
    if n < 2:
        raise DataError(f"need at least 2 good images to split off validation images, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    least = 2 if n >= 4 else 1  # a threshold needs at least two good scores (trainer/calibrate.py)
    n_val = min(n - 1, max(least, int(round(n * val_fraction))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_folder(folder: str | Path, channels: int | None = None, val_fraction: float = 0.1, seed: int = 0,
                limit: int | None = None, resize_to: int | None = None) -> DataSplits:
    """A folder of good images: seeded train/validation split, no test set."""
    from .images import resize

    images, paths = read_images(folder, channels, limit=limit, seed=seed)
    if resize_to:
        images = [resize(im, resize_to, resize_to) for im in images]
    train, val = split_good(len(images), val_fraction, seed)
    return DataSplits(name=Path(folder).name, channels=images[0].shape[2],
                      train=[images[i] for i in train], val=[images[i] for i in val],
                      info={"source": "folder", "path": str(folder), "val_fraction": val_fraction,
                            "seed": seed, "n_train": len(train), "n_val": len(val)})
