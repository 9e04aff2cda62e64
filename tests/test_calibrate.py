"""Calibration: quantile, image score, map normalisation spec and thresholds."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from engines.graph import MapPostprocess
from trainer.calibrate import (
    SCORE_SIGMA,
    calibrate_thresholds,
    gaussian_blur,
    image_score,
    map_spec_from_raw,
    quantile,
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


def test_blur_matches_opencv_replicate():
    m = np.random.default_rng(0).random((3, 1, 20, 17)).astype(np.float64)
    ours = gaussian_blur(m)
    for i in range(3):
        ref = cv2.GaussianBlur(m[i, 0], (9, 9), SCORE_SIGMA, borderType=cv2.BORDER_REPLICATE)
        np.testing.assert_allclose(ours[i, 0], ref, atol=1e-9)


def test_image_score_shapes_and_values():
    flat = np.full((6, 5), 0.3)
    assert image_score(flat) == pytest.approx(0.3)
    impulse = np.zeros((15, 15))
    impulse[7, 7] = 1.0
    # peak of a normalised 9-tap Gaussian (sigma 1), squared for 2-D
    k = np.exp(-0.5 * np.arange(-4, 5) ** 2)
    assert image_score(impulse) == pytest.approx((1 / k.sum()) ** 2)
    batch = np.stack([flat[None], 2 * flat[None]])
    np.testing.assert_allclose(image_score(batch), [[0.3], [0.6]])


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


def test_thresholds_at_false_reject_rate():
    values = np.arange(100, dtype=np.float64)
    maps = values[:, None, None, None] * np.ones((100, 1, 6, 6))  # image score = value
    thr = calibrate_thresholds(maps, frr=0.01, pixel_frr=0.01)
    assert thr.image == pytest.approx(np.quantile(values, 0.99))
    assert thr.pixel == pytest.approx(np.quantile(maps, 0.99))
    assert (values >= thr.image).mean() == pytest.approx(0.01)
