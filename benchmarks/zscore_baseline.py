"""Per-pixel z-score baselines in NumPy: what a learned anomaly model must beat.

Two models of "good", fitted on good grey images (uint8 H x W or H x W x C, averaged to grey):
  position  mean and std of every pixel position over the training images (needs equal sizes);
            map = squared z-score of each pixel.
  patch     three local statistics per pixel (box mean, box std, box mean of the gradient magnitude in a
            ``window`` x ``window`` window), one Gaussian over all training pixels; map = squared
            Mahalanobis distance of each pixel's statistics.
Image score: maximum of the map after a Gaussian blur of sigma 4 px (the product's image score at stride 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["ZScoreModel", "fit_zscore", "zscore_map", "zscore_score"]


@dataclass(frozen=True)
class ZScoreModel:
    mode: str
    mean: np.ndarray
    scale: np.ndarray  # position: per-pixel std; patch: inverse covariance of the statistics
    window: int


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float32)
    return image.mean(axis=2) if image.ndim == 3 else image


def _local_stats(grey: np.ndarray, window: int) -> np.ndarray:
    """H x W x 3: local mean, local std and local mean gradient magnitude (box window)."""
    k = (window, window)
    mean = cv2.blur(grey, k, borderType=cv2.BORDER_REFLECT)
    std = np.sqrt(np.maximum(cv2.blur(grey * grey, k, borderType=cv2.BORDER_REFLECT) - mean * mean, 0))
    grad = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    return np.stack([mean, std, cv2.blur(grad, k, borderType=cv2.BORDER_REFLECT)], axis=-1)


def fit_zscore(images: list[np.ndarray], mode: str = "patch", window: int = 9) -> ZScoreModel:
    """Fit the ``position`` or ``patch`` baseline on good images."""
    greys = [_grey(im) for im in images]
    if mode == "position":
        stack = np.stack(greys)
        return ZScoreModel(mode, stack.mean(axis=0), stack.std(axis=0) + 1.0, window)
    if mode != "patch":
        raise ValueError(f"z-score mode must be 'position' or 'patch', got {mode!r}")
    feats = np.concatenate([_local_stats(g, window).reshape(-1, 3) for g in greys]).astype(np.float64)
    cov = np.cov(feats, rowvar=False) + 1e-3 * np.eye(3)
    return ZScoreModel(mode, feats.mean(axis=0), np.linalg.inv(cov), window)


def zscore_map(model: ZScoreModel, image: np.ndarray) -> np.ndarray:
    """H x W anomaly map of one image."""
    grey = _grey(image)
    if model.mode == "position":
        if grey.shape != model.mean.shape:
            raise ValueError(f"position z-score fitted on {model.mean.shape} images, got {grey.shape}")
        return ((grey - model.mean) / model.scale) ** 2
    d = _local_stats(grey, model.window).astype(np.float64) - model.mean
    return np.einsum("hwi,ij,hwj->hw", d, model.scale, d)


def zscore_score(model: ZScoreModel, image: np.ndarray, sigma: float = 4.0) -> float:
    """Image score: maximum of the blurred map."""
    return float(cv2.GaussianBlur(zscore_map(model, image).astype(np.float32), (0, 0), sigma).max())
