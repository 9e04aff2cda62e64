"""A small synthetic MVTec-AD-like dataset: textured good images, painted defects and their masks.

Used by tests, docs and demos: ``write_mvtec_tree(root, "weave")`` writes
  root/weave/train/good/000.png ...
  root/weave/test/good/000.png, test/scratch/000.png, test/spot/000.png
  root/weave/ground_truth/scratch/000_mask.png, ground_truth/spot/000_mask.png
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

__all__ = ["DEFECT_TYPES", "textured_image", "paint_defect", "write_mvtec_tree"]

DEFECT_TYPES = ("scratch", "spot")


def textured_image(size: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """A regular woven texture (two sinusoid gratings, random phase) plus mild noise, uint8 H x W x C."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    tex = np.sin(xx * 0.7 + phase[0]) * np.sin(yy * 0.7 + phase[1])
    base = 128 + 50 * tex + rng.normal(0, 6, size=(size, size))
    tint = np.array([1.0, 0.9, 0.8][:channels] if channels == 3 else [1.0], dtype=np.float32)
    image = base[:, :, None] * tint
    return np.clip(image, 0, 255).astype(np.uint8)


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint a defect of ``kind`` into a copy of image; return (image, bool mask)."""
    size = image.shape[0]
    mask = np.zeros(image.shape[:2], np.uint8)
    if kind == "scratch":
        p0 = rng.integers(size // 8, size - size // 8, size=2)
        p1 = rng.integers(size // 8, size - size // 8, size=2)
        cv2.line(mask, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1, max(2, size // 40))
    elif kind == "spot":
        centre = rng.integers(size // 4, 3 * size // 4, size=2)
        cv2.circle(mask, tuple(int(v) for v in centre), max(3, size // 12), 1, -1)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECT_TYPES}")
    out = image.copy()
    value = 20 if kind == "scratch" else 235
    out[mask.astype(bool)] = value
    return out, mask.astype(bool)


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = image if image.shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"could not write {path}")


def write_mvtec_tree(root: str | Path, category: str = "weave", size: int = 64, n_train: int = 12,
                     n_test_good: int = 4, n_test_defect: int = 4, channels: int = 3, seed: int = 0) -> Path:
    """Write a synthetic category in MVTec-AD layout under root; return the category folder."""
    rng = np.random.default_rng(seed)
    cat = Path(root) / category
    for i in range(n_train):
        _write(cat / "train" / "good" / f"{i:03d}.png", textured_image(size, rng, channels))
    for i in range(n_test_good):
        _write(cat / "test" / "good" / f"{i:03d}.png", textured_image(size, rng, channels))
    for kind in DEFECT_TYPES:
        for i in range(n_test_defect):
            image, mask = paint_defect(textured_image(size, rng, channels), kind, rng)
            _write(cat / "test" / kind / f"{i:03d}.png", image)
            mask_image = (mask * 255).astype(np.uint8)[:, :, None]
            _write(cat / "ground_truth" / kind / f"{i:03d}_mask.png", mask_image)
    return cat
