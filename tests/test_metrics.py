"""Metrics against hand-computed cases and a brute-force Mann-Whitney reference."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.metrics import MetricError, au_pro, auroc, f1_max, image_auroc, pixel_auroc, pro_curve, roc_curve


def test_roc_curve_points_by_hand():
    fpr, tpr, thr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_auroc_ties_count_half():
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    # pairs (pos, neg): 2>1, 2=2 (1/2), 3>1, 3>2 -> 3.5 / 4
    assert auroc([1, 2, 2, 3], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert auroc([3, 3, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert auroc([1, 1, 3, 3], [1, 1, 0, 0]) == pytest.approx(0.0)


def test_auroc_matches_mann_whitney_on_random_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, size=40).astype(float)
        labels = rng.integers(0, 2, size=40)
        labels[:2] = [0, 1]
        pos, neg = scores[labels == 1], scores[labels == 0]
        diff = pos[:, None] - neg[None, :]
        expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
        assert auroc(scores, labels) == pytest.approx(expected)


def test_pixel_auroc_flattens():
    maps = np.array([[[0.1, 0.9], [0.2, 0.8]]])
    masks = np.array([[[0, 1], [0, 1]]], bool)
    assert pixel_auroc(maps, masks) == pytest.approx(1.0)
    assert pixel_auroc(-maps, masks) == pytest.approx(0.0)


def test_f1_max_by_hand():
    f1, thr = f1_max([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    # at 0.35: tp 2, fp 1, fn 0 -> F1 = 4 / 5
    assert f1 == pytest.approx(0.8)
    assert thr == pytest.approx(0.35)


def test_au_pro_perfect_is_one():
    maps = np.array([[[0.0, 1.0, 3.0, 2.0]]])
    masks = np.array([[[0, 0, 1, 1]]], bool)
    assert au_pro(maps, masks) == pytest.approx(1.0)


def test_au_pro_two_regions_by_hand():
    # regions {0} (area 1) and {3, 4} (area 2); negatives 1, 2, 5
    maps = np.array([[[0.9, 0.8, 0.1, 0.7, 0.2, 0.3]]])
    masks = np.array([[[1, 0, 0, 1, 1, 0]]], bool)
    fpr, pro = pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.75, 0.75, 1, 1])
    assert au_pro(maps, masks, 0.3) == pytest.approx(0.5)
    assert au_pro(maps, masks, 0.5) == pytest.approx((1 / 6 + 0.75 / 6) / 0.5)
    assert au_pro(maps, masks, 1.0) == pytest.approx(1 / 6 + 1 / 4 + 1 / 3)


def test_au_pro_regions_are_8_connected_and_per_region():
    # one diagonal region (8-connected) of 2 pixels: detecting one pixel gives PRO 0.5
    masks = np.array([[[1, 0, 0], [0, 1, 0], [0, 0, 0]]], bool)
    maps = np.array([[[0.9, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.0]]])
    fpr, pro = pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0


def test_degenerate_inputs_raise():
    with pytest.raises(MetricError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(MetricError, match="NaN"):
        auroc([np.nan, 0.2], [0, 1])
    with pytest.raises(MetricError, match="labels"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(MetricError, match="0/1"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(MetricError, match="region"):
        au_pro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool))
    with pytest.raises(MetricError, match="shape"):
        pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 2, 3), bool))
