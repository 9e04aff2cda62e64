"""Calibration on held-out good images: raw-map quantiles (-> MapSpec), image score, thresholds.

Map normalisation: per raw map k, q_a = quantile 0.9 and q_b = quantile 0.995 of its values on the good
validation images; the graph maps q_a -> 0 and q_b -> 0.1 and sums the maps with the model's weights
(engines.graph.MapPostprocess).

Image score (``image_score``): the maximum of the normalised map after a Gaussian blur of sigma
``SCORE_SIGMA`` = 1 map pixel (= 4 input pixels at stride 4, the sigma-4 full-resolution blur common in the
literature), kernel radius 4 sigma, edges replicated. Pure NumPy so the daemon can apply the very same score
to fused frame maps.

Thresholds at a target false-reject rate r on good validation images:
  image_threshold = quantile(1 - r) of the good images' image scores (default r = 1 %);
  pixel_threshold = quantile(1 - r_px) of every good pixel of the normalised maps, r_px = 0.01 % by default:
  a 64 x 64 map then shows on average ~0.4 false segment pixel per good tile.
With few validation images the high quantiles are close to the maximum: more validation images, steadier
thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engines.bundle import MapSpec

__all__ = ["SCORE_SIGMA", "Q_A", "Q_B", "Thresholds", "quantile", "gaussian_blur", "image_score",
           "map_spec_from_raw", "calibrate_thresholds"]

SCORE_SIGMA = 1.0  # map pixels
Q_A, Q_B = 0.9, 0.995
DEFAULT_FRR = 0.01
DEFAULT_PIXEL_FRR = 1e-4


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float
    target_frr: float = DEFAULT_FRR
    pixel_frr: float = DEFAULT_PIXEL_FRR


def quantile(values, q: float) -> float:
    """Linear-interpolated quantile (NumPy's default rule) of any number of values, via partition."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        raise ValueError("quantile of an empty array")
    if not np.all(np.isfinite(flat)):
        raise ValueError("quantile: values contain NaN or infinity")
    pos = q * (flat.size - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    part = np.partition(flat, (lo, hi))
    return float(part[lo] + (pos - lo) * (part[hi] - part[lo]))


def _kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(round(4 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: np.ndarray, sigma: float = SCORE_SIGMA) -> np.ndarray:
    """Separable Gaussian blur over the last two axes of ``maps`` (..., h, w), edges replicated."""
    maps = np.asarray(maps, dtype=np.float64)
    if sigma <= 0:
        return maps
    k = _kernel(sigma)
    r = k.size // 2
    pad = [(0, 0)] * (maps.ndim - 2) + [(r, r), (r, r)]
    padded = np.pad(maps, pad, mode="edge")
    rows = sum(k[i] * padded[..., i:i + maps.shape[-2], :] for i in range(k.size))
    return sum(k[i] * rows[..., :, i:i + maps.shape[-1]] for i in range(k.size))


def image_score(maps, sigma: float = SCORE_SIGMA):
    """Max of the blurred normalised map over its last two axes: (h, w) -> float, (B, 1, h, w) -> (B, 1)."""
    out = gaussian_blur(maps, sigma).max(axis=(-2, -1))
    return float(out) if out.ndim == 0 else out


def _per_map_values(raw, count: int) -> list[np.ndarray]:
    """Raw maps (N x K x h x w array, or a list of K x h x w of any sizes) -> K flat value arrays."""
    maps = [np.asarray(r) for r in raw]
    if not maps or any(m.ndim != 3 or m.shape[0] != count for m in maps):
        shapes = sorted({m.shape for m in maps})
        raise ValueError(f"raw maps must be K x h x w each with K = {count} (one per weight), got {shapes}")
    return [np.concatenate([m[k].ravel() for m in maps]) for k in range(count)]


def map_spec_from_raw(raw, weights: Sequence[float], tile: int, stride: int = 4,
                      q_a: float = Q_A, q_b: float = Q_B) -> MapSpec:
    """MapSpec from the raw maps of good validation images (N x K x h x w, or a list of K x h x w)."""
    if tile % stride:
        raise ValueError(f"tile {tile} is not a multiple of the map stride {stride}")
    values = _per_map_values(raw, len(weights))
    lows = tuple(quantile(v, q_a) for v in values)
    highs = tuple(quantile(v, q_b) for v in values)
    for k, (lo, hi) in enumerate(zip(lows, highs, strict=True)):
        if not hi > lo:
            raise ValueError(f"raw map {k} is constant on the validation images (q_a = q_b = {lo}); "
                             "the model is untrained or the images are identical")
    return MapSpec(height=tile // stride, width=tile // stride, stride=stride, q_a=lows, q_b=highs,
                   weights=tuple(float(w) for w in weights))


def calibrate_thresholds(maps, frr: float = DEFAULT_FRR, pixel_frr: float = DEFAULT_PIXEL_FRR) -> Thresholds:
    """Thresholds from the normalised maps of good validation images (one h x w map each; an N x h x w or
    N x 1 x h x w array, or a list of maps of any sizes)."""
    if not (0 < frr < 1 and 0 < pixel_frr < 1):
        raise ValueError(f"false-reject rates must be in (0, 1), got {frr}, {pixel_frr}")
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    if not maps:
        raise ValueError("no validation maps to calibrate thresholds on")
    scores = np.array([image_score(m) for m in maps], dtype=np.float64).ravel()
    pixels = np.concatenate([m.ravel() for m in maps])
    return Thresholds(image=quantile(scores, 1 - frr), pixel=quantile(pixels, 1 - pixel_frr),
                      target_frr=frr, pixel_frr=pixel_frr)
