"""Calibration: quantile, map normalisation spec, threshold estimator (empirical / tail), rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.graph import MapPostprocess
from trainer.calibrate import (
    calibrate,
    estimate_threshold,
    map_spec_from_raw,
    pixel_threshold,
    quantile,
    wilson_interval,
)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.995, 1.0])
def test_quantile_matches_numpy(n, q):
    values = np.random.default_rng(n).normal(size=n)
    assert quantile(values, q) == pytest.approx(np.quantile(values, q))


def test_quantile_errors():
    with pytest.raises(ValueError, match="empty"):
        quantile([], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quantile([1.0], 1.5)


@pytest.mark.slow
def test_quantile_beyond_torch_limit():
    values = np.zeros((1 << 24) + 3, np.float32)
    values[-1] = 1.0
    assert quantile(values, 1.0) == 1.0
    assert quantile(values, 0.5) == 0.0


def test_map_spec_normalises_quantiles_to_0_and_0_1():
    rng = np.random.default_rng(1)
    raw = np.stack([rng.random((10, 8, 8)), 5 + 3 * rng.random((10, 8, 8))], axis=1).astype(np.float32)
    spec = map_spec_from_raw(raw, weights=(0.5, 0.5), tile=32)
    assert (spec.height, spec.width, spec.stride) == (8, 8, 4)
    assert spec.q_a[1] == pytest.approx(np.quantile(raw[:, 1], 0.9))
    assert spec.q_b[0] == pytest.approx(np.quantile(raw[:, 0], 0.995))
    probe = np.zeros((1, 2, 8, 8), np.float32)
    probe[0, 0], probe[0, 1] = spec.q_b[0], spec.q_a[1]
    out = MapPostprocess(spec)(torch.from_numpy(probe)).numpy()
    np.testing.assert_allclose(out, 0.5 * 0.1, atol=1e-6)


def test_map_spec_rejects_constant_maps_and_bad_shapes():
    with pytest.raises(ValueError, match="constant"):
        map_spec_from_raw(np.ones((3, 1, 4, 4)), weights=(1.0,), tile=16)
    with pytest.raises(ValueError, match="one per weight"):
        map_spec_from_raw(np.ones((3, 2, 4, 4)), weights=(1.0,), tile=16)


def test_threshold_empirical_when_the_sample_resolves_the_rate():
    values = np.arange(1000, dtype=np.float64)
    est = estimate_threshold(values, frr=0.01)
    assert est.estimator == "empirical" and est.resolvable and est.warning is None
    assert est.value == pytest.approx(np.quantile(values, 0.99))
    assert (values >= est.value).mean() == pytest.approx(0.01, abs=1e-3)


@pytest.mark.parametrize("n", [4, 12, 88])
def test_small_sample_warns_and_extrapolates_beyond_the_maximum(n):
    """12 good images cannot resolve 1 %: the estimate says so and does not stop at the sample maximum."""
    scores = np.random.default_rng(n).normal(0.1, 0.02, size=n)
    est = estimate_threshold(scores, frr=0.01)
    assert not est.resolvable and est.estimator == "exponential-tail"
    assert est.warning and f"{n} good images cannot resolve" in est.warning
    assert est.value > scores.max()
    assert est.value == max(est.empirical, est.tail)


def test_tail_estimate_holds_out_of_sample():
    """Fit on 40 draws, check the false-reject rate on 20000 new draws of the same distribution (gamma:
    right-skewed like anomaly scores): close to the target, far below what the sample max gives."""
    rng = np.random.default_rng(7)
    rates = []
    for _ in range(200):
        fit = rng.gamma(4.0, 0.02, size=40)
        rates.append((rng.gamma(4.0, 0.02, size=20000) >= estimate_threshold(fit, 0.01).value).mean())
    assert np.median(rates) <= 0.02
    assert np.mean(rates) <= 0.03


def test_pixel_threshold_never_above_the_image_threshold():
    maps = [np.full((4, 4), 0.5), np.full((4, 4), 0.6)]
    assert pixel_threshold(maps, 1e-4, image_threshold=0.2) == 0.2
    assert pixel_threshold(maps, 0.5, image_threshold=10.0) == pytest.approx(np.quantile(np.stack(maps), 0.5))


def test_calibrate_records_rates_with_bounds():
    good = np.linspace(0.0, 1.0, 500)
    bad = np.linspace(0.9, 2.0, 100)
    cal = calibrate(good, [np.zeros((3, 3))], frr=0.02, defective_scores=bad, source="unit")
    rate, low, high = cal.observed_frr
    assert low <= rate <= high and rate == pytest.approx(0.02, abs=0.005)
    assert cal.observed_miss[0] == pytest.approx((bad < cal.thresholds.image).mean())
    record = cal.to_dict()
    assert record["n_good"] == 500 and record["n_defective"] == 100 and record["source"] == "unit"
    assert record["image_threshold"]["estimator"] == "empirical"


def test_wilson_interval():
    assert wilson_interval(0, 100)[1] == 0.0 and wilson_interval(0, 100)[2] == pytest.approx(0.037, abs=1e-3)
    rate, low, high = wilson_interval(10, 100)
    assert (rate, round(low, 3), round(high, 3)) == (0.1, 0.055, 0.174)


def test_threshold_refuses_non_finite_and_too_few():
    with pytest.raises(ValueError, match="NaN"):
        estimate_threshold([0.1, np.nan, 0.2])
    with pytest.raises(ValueError, match="at least 2"):
        estimate_threshold([0.1])
