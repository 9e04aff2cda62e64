"""A labelled folder of your own, evaluated like MVTec-AD's test set:

    DIR/good/*.png                            good images (label 0)
    DIR/<defect type>/*.png                   one folder per defect type, any names (label 1)
    DIR/ground_truth/<defect type>/<stem>_mask.png   optional masks (white = defect), MVTec naming

With masks for every defect type the pixel metrics (pixel AUROC, AU-PRO) are computed as for MVTec; without
``ground_truth/`` only the image metrics are. Images: .png/.jpg/.jpeg/.bmp/.tif/.tiff, one channel count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import GOOD, DataSplits, EvalSet, split_good
from .images import DataError, read_images, read_mask, resize

__all__ = ["load_eval_set", "load_labelled_folder", "MASKS"]

MASKS = "ground_truth"


def _mask_for(gt: Path, group: str, image_path: Path, shape: tuple[int, int]) -> np.ndarray:
    if group == GOOD:
        return np.zeros(shape, bool)
    path = gt / group / f"{image_path.stem}_mask.png"
    if not path.is_file():
        raise DataError(f"ground-truth mask {path} is missing for {image_path}", path)
    return read_mask(path, shape)


def load_eval_set(test_dir: Path, gt_dir: Path | None, channels: int | None = None,
                  resize_to: int | None = None) -> EvalSet:
    """Every ``<type>/`` folder of ``test_dir`` (``good`` = label 0); masks from ``gt_dir`` when given."""
    images, masks, labels, groups, names = [], [], [], [], []
    folders = sorted(p for p in test_dir.iterdir() if p.is_dir() and p.name != MASKS)
    for group_dir in folders:
        group_images, paths = read_images(group_dir, channels)
        channels = group_images[0].shape[2]
        for image, path in zip(group_images, paths, strict=True):
            mask = None if gt_dir is None else _mask_for(gt_dir, group_dir.name, path, image.shape[:2])
            if resize_to:
                image = resize(image, resize_to, resize_to)
                mask = None if mask is None else resize(mask, resize_to, resize_to, nearest=True)
            images.append(image)
            masks.append(mask)
            labels.append(int(group_dir.name != GOOD))
            groups.append(group_dir.name)
            names.append(f"{group_dir.name}/{path.name}")
    return EvalSet(images=images, labels=np.array(labels), groups=tuple(groups), names=tuple(names),
                   masks=None if gt_dir is None else masks)


def load_labelled_folder(folder: str | Path, val_fraction: float = 0.0, seed: int = 0,
                         resize_to: int | None = None, channels: int | None = None) -> DataSplits:
    """A labelled folder as DataSplits: all of it the test set, or, with ``val_fraction`` > 0, a seeded
    share of ``good/`` held out as validation images (to calibrate a checkpoint) and left out of the test."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"labelled folder {root} does not exist", root)
    if not (root / GOOD).is_dir():
        raise DataError(f"{root} has no good/ folder: a labelled folder holds good/ and one folder per "
                        f"defect type (optional ground_truth/<type>/<name>_mask.png)", root)
    defect_dirs = [p for p in root.iterdir() if p.is_dir() and p.name not in (GOOD, MASKS)]
    if not defect_dirs:
        raise DataError(f"{root} has good/ but no defect folder: add one folder per defect type next to "
                        f"good/", root)
    gt = root / MASKS if (root / MASKS).is_dir() else None
    data = load_eval_set(root, gt, channels, resize_to)
    val: list[np.ndarray] = []
    keep = np.arange(len(data.images))
    if val_fraction > 0:
        good = np.flatnonzero(data.labels == 0)
        _, val_pick = split_good(len(good), val_fraction, seed)
        val = [data.images[i] for i in good[val_pick]]
        keep = np.setdiff1d(keep, good[val_pick])
        data = EvalSet(images=[data.images[i] for i in keep], labels=data.labels[keep],
                       groups=tuple(data.groups[i] for i in keep), names=tuple(data.names[i] for i in keep),
                       masks=None if data.masks is None else [data.masks[i] for i in keep])
    info = {"source": "labelled-folder", "path": str(root), "val_fraction": val_fraction, "seed": seed,
            "resize": resize_to, "n_val": len(val), "n_test": len(data.images), "masks": gt is not None}
    return DataSplits(name=root.name, channels=data.images[0].shape[2], train=[], val=val, test=data,
                      info=info)
