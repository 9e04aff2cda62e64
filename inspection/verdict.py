"""Verdict: image score, defect regions and PASS/FAIL from a fused anomaly map (pure functions).

- The map is smoothed once (Gaussian, sigma in map pixels; 0 = off). Score, regions, peaks and means all
  read the smoothed map, so a region's peak is always above the pixel threshold.
- Image score: ``max`` of the smoothed map over inspected pixels, or ``topk``: mean of the k largest.
- Regions: 8-connected components (cv2.connectedComponentsWithStats) of inspected pixels above the pixel
  threshold; area and bounding box in frame pixels (map pixels x stride, clipped to the frame); components
  smaller than ``min_area`` frame pixels are dropped; the rest sorted by peak, the list capped at
  ``max_regions`` (the count in the reason is the full one).
- FAIL when score >= image threshold. Every FAIL carries at least one region: when no component passes the
  pixel threshold and minimum area (a camera's image threshold set below the region threshold, or a small
  peak), the component around the highest inspected pixel, cut at min(pixel, image threshold), is reported.
- With no inspected pixel at all (ignore zones cover the ROI) the frame PASSes with score 0.0 and says so.
- Non-finite maps (NaN/inf: a numeric overflow in the engine) never PASS: an inspected NaN/inf pixel makes the
  frame FAIL with score +inf, the reason says how many, and the regions are the non-finite pixels' components.
  NaN/inf outside the inspected pixels is set to 0 before smoothing, so it cannot leak into them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["SCORE_MODES", "Region", "Verdict", "smooth_map", "image_score", "find_regions", "peak_region",
           "decide", "nonfinite_verdict"]

SCORE_MODES = ("max", "topk")


@dataclass(frozen=True)
class Region:
    x: int  # bounding box, frame pixels
    y: int
    w: int
    h: int
    area: int  # frame pixels (map pixels x stride^2)
    peak: float
    mean: float


@dataclass(frozen=True)
class Verdict:
    verdict: str  # "PASS" | "FAIL"
    reason: str
    score: float
    threshold: float
    regions: list[Region]


def smooth_map(anomaly_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing in map pixels (reflected borders); the map itself when sigma is 0."""
    if sigma <= 0:
        return anomaly_map
    import cv2

    return cv2.GaussianBlur(anomaly_map, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def image_score(smoothed: np.ndarray, mask: np.ndarray | None, mode: str = "max",
                topk: int = 100) -> float | None:
    """Score over inspected pixels (mask True, or all); None when nothing is inspected."""
    values = smoothed.ravel() if mask is None else smoothed[mask]
    if values.size == 0:
        return None
    if mode == "max":
        return float(values.max())
    if mode == "topk":
        k = min(topk, values.size)
        return float(np.partition(values, values.size - k)[values.size - k:].mean(dtype=np.float64))
    raise ValueError(f"score must be one of {SCORE_MODES}, got {mode!r}")


def find_regions(smoothed: np.ndarray, mask: np.ndarray | None, pixel_threshold: float, stride: int,
                 frame_hw: tuple[int, int], min_area: int = 0) -> list[Region]:
    """Connected regions above the pixel threshold, biggest peak first (frame-pixel boxes)."""
    import cv2

    binary = smoothed > pixel_threshold
    if mask is not None:
        binary &= mask
    if not binary.any():
        return []
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.view(np.uint8), connectivity=8)
    fg = labels[binary]
    vals = smoothed[binary].astype(np.float64)
    sums = np.bincount(fg, weights=vals, minlength=count)
    peaks = np.full(count, -np.inf)
    np.maximum.at(peaks, fg, vals)
    frame_h, frame_w = frame_hw
    area_px = stride * stride
    regions = []
    for label in range(1, count):
        left, top, width, height, n = (int(v) for v in stats[label])
        if n * area_px < min_area:
            continue
        x, y = left * stride, top * stride
        w, h = min(width * stride, frame_w - x), min(height * stride, frame_h - y)
        regions.append(Region(x=x, y=y, w=w, h=h, area=n * area_px, peak=float(peaks[label]),
                              mean=float(sums[label] / n)))
    regions.sort(key=lambda r: r.peak, reverse=True)
    return regions


def peak_region(smoothed: np.ndarray, mask: np.ndarray | None, level: float, stride: int,
                frame_hw: tuple[int, int]) -> list[Region]:
    """The connected region around the highest inspected pixel, cut at ``level`` (no minimum area)."""
    values = smoothed if mask is None else np.where(mask, smoothed, -np.inf)
    peak = np.unravel_index(int(np.argmax(values)), values.shape)
    level = min(level, float(values[peak]))
    regions = find_regions(smoothed, mask, np.nextafter(level, -np.inf), stride, frame_hw, 0)
    y, x = peak[0] * stride, peak[1] * stride
    return [r for r in regions if r.x <= x < r.x + r.w and r.y <= y < r.y + r.h][:1] or regions[:1]


def decide(anomaly_map: np.ndarray, mask: np.ndarray | None, *, stride: int, frame_hw: tuple[int, int],
           image_threshold: float, pixel_threshold: float, score_mode: str = "max", topk: int = 100,
           sigma: float = 1.0, min_area: int = 0, max_regions: int = 64) -> Verdict:
    """PASS/FAIL of one fused frame map (output scale) with score, threshold, regions and the reason."""
    anomaly_map, bad = _split_nonfinite(anomaly_map, mask)
    if bad is not None:
        return nonfinite_verdict(bad, stride, frame_hw, image_threshold, max_regions)
    smoothed = smooth_map(anomaly_map, sigma)
    score = image_score(smoothed, mask, score_mode, topk)
    if score is None:
        return Verdict("PASS", "no inspected pixels (ignore zones cover the ROI)", 0.0, image_threshold, [])
    regions = find_regions(smoothed, mask, pixel_threshold, stride, frame_hw, min_area)
    if score >= image_threshold and not regions:  # every FAIL says where: the peak's region at least
        regions = peak_region(smoothed, mask, min(pixel_threshold, image_threshold), stride, frame_hw)
    found = len(regions)
    plural = "region" if found == 1 else "regions"
    if score >= image_threshold:
        reason = f"score {score:.4g} >= threshold {image_threshold:.4g}; {found} {plural}"
        verdict = "FAIL"
    else:
        reason = f"score {score:.4g} below threshold {image_threshold:.4g}"
        if found:
            reason += f"; {found} {plural} above pixel threshold {pixel_threshold:.4g}"
        verdict = "PASS"
    return Verdict(verdict, reason, score, image_threshold, regions[:max_regions])


def _split_nonfinite(anomaly_map: np.ndarray, mask: np.ndarray | None):
    """(map, None) if every inspected pixel is finite (NaN/inf outside them set to 0), else (map, bad)."""
    finite = np.isfinite(anomaly_map)
    if finite.all():
        return anomaly_map, None
    bad = ~finite if mask is None else ~finite & mask
    if bad.any():
        return anomaly_map, bad
    return np.where(finite, anomaly_map, 0.0).astype(np.float32), None


def nonfinite_verdict(bad: np.ndarray, stride: int, frame_hw: tuple[int, int], image_threshold: float,
                      max_regions: int = 64) -> Verdict:
    """FAIL for a map with NaN/inf inspected pixels (``bad``): score +inf, regions = their components."""
    regions = [replace(r, peak=math.inf, mean=math.inf)
               for r in find_regions(bad.astype(np.float32), None, 0.5, stride, frame_hw)]
    reason = (f"non-finite anomaly map: {int(bad.sum())} inspected pixels are NaN/inf (numeric overflow in "
              f"the engine?), FAIL by rule; {len(regions)} {'region' if len(regions) == 1 else 'regions'}")
    return Verdict("FAIL", reason, math.inf, image_threshold, regions[:max_regions])
