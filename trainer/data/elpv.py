"""ELPV solar-cell electroluminescence images (package ``elpv-dataset``; nothing is copied into the repo).

2,624 mono 300 x 300 cells, each with a defect probability in {0, 1/3, 2/3, 1} and a type ("mono", "poly").
Split, per cell type, seeded (``seed``, default 0):
  - good cells (probability 0) are permuted; ``test_good_fraction`` (25 %) go to the test set,
    ``val_fraction`` (15 %) to validation (map quantiles and thresholds), the rest (60 %) to training;
  - test = held-out good cells (label 0) vs cells with probability 1 (label 1, group "defect");
    cells with probability 1/3 and 2/3 are also in the test set, as groups "prob_0.33" and "prob_0.67",
    kept out of the headline metrics and reported separately (good vs that group).
Training takes random tile crops of the good cells at native resolution; evaluation runs the fully
convolutional core on whole 300 x 300 cells.

Loading every image takes a few seconds: the arrays are cached in-process. ``limit`` loads only a seeded
random subset of that type's cells (for tests and quick runs).
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from . import GOOD, DataSplits, EvalSet
from .images import DataError, read_image

__all__ = ["CELL_TYPES", "load_elpv", "elpv_labels"]

CELL_TYPES = ("mono", "poly")
UNCERTAIN = {1: "prob_0.33", 2: "prob_0.67"}  # probability * 3 -> group name


def _data_dir() -> Path:
    try:
        import elpv_dataset
    except ImportError as exc:
        raise DataError("ELPV needs the 'elpv-dataset' package: pip install elpv-dataset") from exc
    return Path(elpv_dataset.__file__).parent / "data"


@functools.lru_cache(maxsize=1)
def elpv_labels() -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    """(relative image paths, probabilities, types) in the package's order."""
    data = np.genfromtxt(_data_dir() / "labels.csv", dtype=["|S19", "<f8", "|S4"],
                         names=["path", "probability", "type"])
    return (tuple(np.char.decode(data["path"])), data["probability"].astype(np.float64),
            tuple(np.char.decode(data["type"])))


@functools.lru_cache(maxsize=1)
def _all_images() -> np.ndarray:
    from elpv_dataset.utils import load_dataset

    images, _, _ = load_dataset()
    return images


def _images(indices: np.ndarray, limited: bool, resize_to: int | None = None) -> list[np.ndarray]:
    if not limited:
        all_images = _all_images()
        images = [all_images[i][:, :, None] for i in indices]
    else:
        paths = elpv_labels()[0]
        images = [read_image(_data_dir() / paths[i], channels=1) for i in indices]
    if resize_to is None:
        return images
    return [cv2.resize(im, (resize_to, resize_to), interpolation=cv2.INTER_AREA)[:, :, None] for im in images]


def _type_indices(cell_type: str, limit: int | None, seed: int) -> np.ndarray:
    if cell_type not in CELL_TYPES:
        raise DataError(f"ELPV cell type must be one of {CELL_TYPES}, got {cell_type!r}")
    types = np.array(elpv_labels()[2])
    indices = np.flatnonzero(types == cell_type)
    if limit is not None and limit < len(indices):
        pick = np.random.default_rng(seed + 1).choice(len(indices), size=limit, replace=False)
        indices = np.sort(indices[pick])
    return indices


def load_elpv(cell_type: str, seed: int = 0, val_fraction: float = 0.15, test_good_fraction: float = 0.25,
              limit: int | None = None, resize_to: int | None = None) -> DataSplits:
    """The documented split of one cell type (see the module docstring); resize_to N scales cells to N x N."""
    indices = _type_indices(cell_type, limit, seed)
    levels = np.rint(elpv_labels()[1][indices] * 3).astype(int)  # 0, 1, 2, 3
    good = indices[levels == 0]
    perm = np.random.default_rng(seed).permutation(len(good))
    n_test, n_val = int(round(len(good) * test_good_fraction)), int(round(len(good) * val_fraction))
    if len(good) - n_test - n_val < 1 or n_val < 1 or n_test < 1:
        raise DataError(f"ELPV {cell_type}: only {len(good)} good cells; raise limit")
    test_good, val_idx = good[perm[:n_test]], good[perm[n_test:n_test + n_val]]
    train_idx = good[perm[n_test + n_val:]]
    test_idx = np.concatenate([test_good, indices[levels == 3], indices[levels == 1], indices[levels == 2]])
    level_of = dict(zip(indices.tolist(), levels.tolist(), strict=True))
    groups = tuple(GOOD if level_of[i] == 0 else "defect" if level_of[i] == 3 else UNCERTAIN[level_of[i]]
                   for i in test_idx.tolist())
    if "defect" not in groups:
        raise DataError(f"ELPV {cell_type}: no defective cells in the selection; raise limit")
    limited = limit is not None
    paths = elpv_labels()[0]
    test = EvalSet(images=_images(test_idx, limited, resize_to),
                   labels=np.array([int(g != GOOD) for g in groups]),
                   groups=groups, names=tuple(Path(paths[i]).name for i in test_idx),
                   separate_groups=tuple(UNCERTAIN.values()))
    info = {"source": "elpv", "type": cell_type, "seed": seed, "val_fraction": val_fraction,
            "test_good_fraction": test_good_fraction, "limit": limit, "resize_to": resize_to,
            "n_train": len(train_idx),
            "n_val": len(val_idx), "n_test_good": len(test_good), "n_test_defect": int((levels == 3).sum()),
            "n_prob_0.33": int((levels == 1).sum()), "n_prob_0.67": int((levels == 2).sum())}
    return DataSplits(name=f"elpv-{cell_type}", channels=1, train=_images(train_idx, limited, resize_to),
                      val=_images(val_idx, limited, resize_to), test=test, info=info)
