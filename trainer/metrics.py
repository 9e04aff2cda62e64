"""Anomaly-detection metrics in pure NumPy: AUROC (image and pixel), AU-PRO, F1-max, ROC points.

Conventions: higher score = more anomalous; a sample is predicted defective when ``score >= threshold``.
Ties are handled by evaluating only at distinct score values (tied samples switch together), so AUROC
equals the Mann-Whitney statistic with ties counted 1/2. Degenerate input (one class only, NaN scores,
length mismatch, no defect regions) raises ``MetricError`` with the reason.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["MetricError", "roc_curve", "auroc", "image_auroc", "pixel_auroc", "pro_curve", "au_pro", "f1_max"]


class MetricError(ValueError):
    """A metric is undefined for the given scores/labels."""


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise MetricError(f"{scores.size} scores but {labels.size} labels")
    if scores.size == 0:
        raise MetricError("no scores")
    if not np.all(np.isfinite(scores)):
        raise MetricError("scores contain NaN or infinity")
    if labels.dtype != bool and not np.isin(labels, (0, 1)).all():
        raise MetricError("labels must be 0/1 or boolean")
    labels = labels.astype(bool)
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        raise MetricError(f"need both classes, got {positives} positive of {labels.size}")
    return scores, labels


def _distinct_counts(scores: np.ndarray, labels: np.ndarray):
    """Sort descending; at each distinct score, cumulative true/false positives and the score."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[ends]
    fps = ends + 1 - tps
    return tps, fps, s[ends]


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf."""
    scores, labels = _check(scores, labels)
    tps, fps, thresholds = _distinct_counts(scores, labels)
    tpr = np.r_[0.0, tps / labels.sum()]
    fpr = np.r_[0.0, fps / (~labels).sum()]
    return fpr, tpr, np.r_[np.inf, thresholds]


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def auroc(scores, labels) -> float:
    fpr, tpr, _ = roc_curve(scores, labels)
    return _trapezoid(tpr, fpr)


def image_auroc(image_scores, labels) -> float:
    """AUROC of per-image scores against per-image labels (1 = defective)."""
    return auroc(image_scores, labels)


def pixel_auroc(maps, masks) -> float:
    """AUROC over every pixel: maps N x H x W float, masks N x H x W bool (same shape)."""
    maps, masks = np.asarray(maps), np.asarray(masks)
    if maps.shape != masks.shape:
        raise MetricError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    return auroc(maps, masks)


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """Per pixel 1 / (region area * number of regions) inside ground-truth regions (8-connected), else 0."""
    weights = np.zeros(masks.shape, np.float64)
    areas = []
    for i, mask in enumerate(masks):
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        sizes = np.bincount(labels.ravel(), minlength=count)
        for r in range(1, count):
            weights[i][labels == r] = 1.0 / sizes[r]
            areas.append(sizes[r])
    if not areas:
        raise MetricError("AU-PRO needs at least one defect region in the masks")
    return weights / len(areas)


def pro_curve(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, mean per-region overlap) at every distinct threshold, from (0, 0) to (1, 1)."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise MetricError(f"maps {maps.shape} and masks {masks.shape} must both be N x H x W")
    if not np.all(np.isfinite(maps)):
        raise MetricError("maps contain NaN or infinity")
    negatives = int((~masks).sum())
    if negatives == 0:
        raise MetricError("AU-PRO needs defect-free pixels")
    pro_w = _region_weights(masks).ravel()
    neg_w = (~masks).ravel() / negatives
    order = np.argsort(-maps.ravel(), kind="mergesort")
    s = maps.ravel()[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    fpr = np.r_[0.0, np.cumsum(neg_w[order])[ends]]
    pro = np.r_[0.0, np.cumsum(pro_w[order])[ends]]
    return np.minimum(fpr, 1.0), np.minimum(pro, 1.0)


def au_pro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (1.0 = perfect)."""
    if not 0 < fpr_limit <= 1:
        raise MetricError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:  # interpolate the curve at the limit
        j = np.searchsorted(fpr, fpr_limit)  # first point beyond the limit
        t = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x, y = np.r_[x, fpr_limit], np.r_[y, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    return _trapezoid(y, x) / fpr_limit


def f1_max(scores, labels) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (predict defective if score >= it)."""
    scores, labels = _check(scores, labels)
    tps, fps, thresholds = _distinct_counts(scores, labels)
    positives = labels.sum()
    f1 = 2 * tps / (2 * tps + fps + (positives - tps))
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])
