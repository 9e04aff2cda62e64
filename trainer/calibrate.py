"""Calibration: map normalisation (MapSpec) and thresholds, from good images the model never trained on.

Every score here is the daemon's own: images are scored by trainer.scoring through inspection.pipeline
(tiling, fusion, smoothing, image score), so a threshold means the same in the trainer, in
`edge-train calibrate` and on the line.

Map normalisation: per raw map k, q_a = quantile 0.9 and q_b = quantile 0.995 of its values on the good
validation images; the graph maps q_a -> 0 and q_b -> 0.1 and sums the maps with the model's weights
(engines.graph.MapPostprocess). For a one-map model this is an affine rescaling: it cannot change which
images pass, so fitting it on the same images as the threshold biases nothing.

Image threshold at a target false-reject rate r from n out-of-sample good scores (``estimate_threshold``):
  - ``empirical``: the (1 - r) quantile, used alone when n * r >= MIN_EXCEEDANCES (at least 3 good images
    expected above the threshold: the sample resolves r);
  - otherwise the sample cannot resolve r (12 images cannot say where the top 1 % starts; the sample maximum
    is an optimistic estimate of it). Then a peaks-over-threshold fit with an exponential tail: the m largest
    scores (m = max(5, n / 5), at most n - 1) above u, the next largest score, have mean excess beta; the
    tail P(S > u + x) = (m / n) exp(-x / beta) gives threshold = u + beta * ln((m / n) / r). The threshold is
    the larger of this and the empirical quantile (conservative: it may exceed the sample maximum), and
    the bundle records ``resolvable: false`` and a warning line saying so.
Pixel (region) threshold: quantile (1 - r_px) of every good pixel of the smoothed out-of-sample frame maps
(r_px = 1e-4 by default), and never above the image threshold: the peak of any frame that FAILs is then
always inside a region (inspection.verdict also guarantees it when a camera overrides the threshold).
Expected rates: the observed false-reject rate of the calibration images (and the miss rate of defective
ones when given) with 95 % Wilson score intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from engines.bundle import MapSpec

__all__ = ["Q_A", "Q_B", "DEFAULT_FRR", "DEFAULT_PIXEL_FRR", "MIN_EXCEEDANCES", "Thresholds",
           "ThresholdEstimate", "Calibration", "quantile", "map_spec_from_raw", "estimate_threshold",
           "pixel_threshold", "wilson_interval", "calibrate"]

Q_A, Q_B = 0.9, 0.995
DEFAULT_FRR = 0.01
DEFAULT_PIXEL_FRR = 1e-4
MIN_EXCEEDANCES = 3  # good images expected above the threshold for the empirical quantile to be trusted
MIN_TAIL = 5  # scores in the exponential tail fit, at least


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float
    target_frr: float = DEFAULT_FRR
    pixel_frr: float = DEFAULT_PIXEL_FRR


@dataclass(frozen=True)
class ThresholdEstimate:
    value: float
    n: int  # good scores it rests on
    target_frr: float
    estimator: str  # "empirical" | "exponential-tail"
    empirical: float
    tail: float | None  # the exponential-tail estimate (None when the sample resolves the rate)
    resolvable: bool
    warning: str | None = None


@dataclass(frozen=True)
class Calibration:
    """Thresholds plus everything bundle.json records about how they were set."""

    thresholds: Thresholds
    image: ThresholdEstimate
    source: str  # where the good scores came from, e.g. "validation split (88 images) + 5-fold training"
    n_good: int
    observed_frr: tuple[float, float, float]  # rate, 95 % low, 95 % high on the calibration images
    n_defective: int = 0
    observed_miss: tuple[float, float, float] | None = None
    scoring: dict = field(default_factory=dict)  # the inspection settings the scores were taken with

    def to_dict(self) -> dict:
        return {"source": self.source, "n_good": self.n_good, "n_defective": self.n_defective,
                "image_threshold": asdict(self.image), "pixel_threshold": self.thresholds.pixel,
                "pixel_frr": self.thresholds.pixel_frr,
                "observed_frr": list(self.observed_frr),
                "observed_miss": None if self.observed_miss is None else list(self.observed_miss),
                "scoring": dict(self.scoring)}


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


def _finite_scores(scores, what: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{what}: {int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    return s


def _exponential_tail(s: np.ndarray, frr: float) -> tuple[float, int]:
    """Peaks over threshold with an exponential tail: (threshold at rate frr, number of tail scores)."""
    n = s.size
    m = min(n - 1, max(MIN_TAIL, int(math.ceil(0.2 * n))))
    top = np.sort(s)[::-1]
    u = float(top[m])  # the largest score outside the tail
    beta = float(np.mean(top[:m] - u))
    p_u = m / n
    if beta <= 0 or p_u <= frr:
        return float(top[0]), m
    return u + beta * math.log(p_u / frr), m


def estimate_threshold(scores, frr: float = DEFAULT_FRR) -> ThresholdEstimate:
    """Image threshold at false-reject rate ``frr`` from out-of-sample good scores (module docstring)."""
    if not 0 < frr < 1:
        raise ValueError(f"false-reject rate must be in (0, 1), got {frr}")
    s = _finite_scores(scores, "good scores")
    n = s.size
    if n < 2:
        raise ValueError(f"need at least 2 good images to set a threshold, got {n}")
    empirical = quantile(s, 1.0 - frr)
    if n * frr >= MIN_EXCEEDANCES:
        return ThresholdEstimate(empirical, n, frr, "empirical", empirical, None, True)
    tail, m = _exponential_tail(s, frr)
    value = max(empirical, tail)
    needed = int(math.ceil(MIN_EXCEEDANCES / frr))
    warning = (f"{n} good images cannot resolve a false-reject rate of {frr:g} (that needs >= {needed}); "
               f"threshold {value:.4g} from an exponential tail fit of the top {m} scores "
               f"(sample maximum {float(s.max()):.4g}): collect more good images, then edge-train calibrate")
    return ThresholdEstimate(value, n, frr, "exponential-tail", empirical, tail, False, warning)


def pixel_threshold(smoothed_maps, pixel_frr: float, image_threshold: float) -> float:
    """Quantile (1 - pixel_frr) of every pixel of the smoothed good maps, capped at the image threshold."""
    if not 0 < pixel_frr < 1:
        raise ValueError(f"pixel false-positive rate must be in (0, 1), got {pixel_frr}")
    maps = [np.asarray(m, dtype=np.float64) for m in smoothed_maps]
    if not maps:
        raise ValueError("no good maps to set the pixel threshold on")
    pixels = np.concatenate([m.ravel() for m in maps])
    return min(quantile(pixels, 1.0 - pixel_frr), float(image_threshold))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """(rate, low, high): k events in n trials with the Wilson score interval (95 % for z = 1.96)."""
    if n <= 0:
        return (float("nan"), 0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (p, max(0.0, centre - half), min(1.0, centre + half))


def calibrate(good_scores, good_smoothed_maps, frr: float = DEFAULT_FRR,
              pixel_frr: float = DEFAULT_PIXEL_FRR, source: str = "", defective_scores=None,
              scoring: dict | None = None) -> Calibration:
    """Thresholds and their record from out-of-sample good scores/maps (and optional defective scores)."""
    image = estimate_threshold(good_scores, frr)
    pixel = pixel_threshold(good_smoothed_maps, pixel_frr, image.value)
    good = _finite_scores(good_scores, "good scores")
    observed = wilson_interval(int((good >= image.value).sum()), good.size)
    miss, n_bad = None, 0
    if defective_scores is not None and len(defective_scores):
        bad = _finite_scores(defective_scores, "defective scores")
        n_bad = bad.size
        miss = wilson_interval(int((bad < image.value).sum()), n_bad)
    return Calibration(Thresholds(image.value, pixel, frr, pixel_frr), image, source or f"{good.size} good",
                       good.size, observed, n_bad, miss, scoring or {})
