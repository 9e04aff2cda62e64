"""Verdict: image score, regions (frame-pixel boxes), masks, PASS/FAIL reasons."""

from __future__ import annotations

import numpy as np
import pytest

from inspection.verdict import decide, find_regions, image_score, smooth_map


def _blobs() -> np.ndarray:
    m = np.zeros((20, 30), np.float32)
    m[2:5, 3:7] = 0.8  # 3 x 4 map pixels
    m[3, 4] = 0.9
    m[10:12, 20:21] = 0.7  # 2 x 1 map pixels
    m[18:20, 28:30] = 0.6  # touches the frame's bottom-right corner
    return m


def test_score_max_and_topk():
    rng = np.random.default_rng(0)
    m = rng.random((16, 16), dtype=np.float32)
    assert image_score(m, None, "max") == pytest.approx(m.max())
    top = np.sort(m.ravel())[-10:].mean()
    assert image_score(m, None, "topk", 10) == pytest.approx(top, rel=1e-6)
    assert image_score(m, None, "topk", 10_000) == pytest.approx(m.mean(), rel=1e-6)  # k clipped
    with pytest.raises(ValueError, match="score must be"):
        image_score(m, None, "median")


def test_score_respects_mask():
    m = np.zeros((8, 8), np.float32)
    m[0, 0] = 5.0
    mask = np.ones((8, 8), bool)
    mask[0, 0] = False
    assert image_score(m, mask) == 0.0
    assert image_score(m, np.zeros((8, 8), bool)) is None


def test_smoothing_lowers_a_spike_and_keeps_a_plateau():
    m = np.zeros((21, 21), np.float32)
    m[10, 10] = 1.0
    assert smooth_map(m, 0) is m
    assert smooth_map(m, 1.0).max() < 0.5
    flat = np.full((21, 21), 0.3, np.float32)
    np.testing.assert_allclose(smooth_map(flat, 2.0), 0.3, rtol=1e-6)


def test_regions_boxes_in_frame_pixels():
    m = _blobs()
    regions = find_regions(m, None, 0.5, stride=4, frame_hw=(78, 118), min_area=0)
    assert [round(r.peak, 3) for r in regions] == [0.9, 0.7, 0.6]  # sorted by peak
    first = regions[0]
    assert (first.x, first.y, first.w, first.h) == (12, 8, 16, 12)
    assert first.area == 12 * 16
    assert first.mean == pytest.approx((11 * 0.8 + 0.9) / 12, rel=1e-6)
    corner = regions[2]
    assert (corner.x, corner.y) == (112, 72)
    assert (corner.w, corner.h) == (6, 6)  # clipped to the 118 x 78 frame


def test_regions_min_area_and_mask():
    m = _blobs()
    big_only = find_regions(m, None, 0.5, stride=4, frame_hw=(80, 120), min_area=33)
    assert [r.area for r in big_only] == [192, 64]  # the 2-pixel blob (32 frame px) is dropped
    mask = np.ones_like(m, dtype=bool)
    mask[:8, :] = False  # ignore the top blob
    assert [r.peak for r in find_regions(m, mask, 0.5, 4, (80, 120))] == pytest.approx([0.7, 0.6])
    assert find_regions(np.zeros((4, 4), np.float32), None, 0.5, 4, (16, 16)) == []


def test_decide_fail_and_pass_reasons():
    m = _blobs()
    kwargs = dict(stride=4, frame_hw=(80, 120), pixel_threshold=0.5, sigma=0.0, min_area=0)
    fail = decide(m, None, image_threshold=0.85, **kwargs)
    assert fail.verdict == "FAIL" and fail.score == pytest.approx(0.9) and fail.threshold == 0.85
    assert fail.reason == "score 0.9 >= threshold 0.85; 3 regions"
    assert len(fail.regions) == 3
    ok = decide(m, None, image_threshold=0.95, **kwargs)
    assert ok.verdict == "PASS"
    assert ok.reason.startswith("score 0.9 below threshold 0.95") and "3 regions" in ok.reason
    capped = decide(m, None, image_threshold=0.85, max_regions=1, **kwargs)
    assert len(capped.regions) == 1 and "3 regions" in capped.reason
    quiet = decide(np.zeros((8, 8), np.float32), None, image_threshold=0.5, **kwargs)
    assert (quiet.verdict, quiet.reason) == ("PASS", "score 0 below threshold 0.5")


def test_decide_with_nothing_inspected():
    out = decide(_blobs(), np.zeros((20, 30), bool), stride=4, frame_hw=(80, 120), image_threshold=0.5,
                 pixel_threshold=0.5)
    assert out.verdict == "PASS" and "no inspected pixels" in out.reason and out.regions == []


@pytest.mark.parametrize("case", ["camera threshold below region threshold", "peak smaller than min_area",
                                  "topk score", "masked peak"])
def test_every_fail_carries_the_peak_region(case):
    """A FAIL with no region above the pixel threshold still says where: the region around its peak."""
    m = np.zeros((16, 16), np.float32)
    m[9, 5] = 0.5  # one map pixel: 16 frame pixels at stride 4
    m[2, 2] = 0.9
    kw = dict(stride=4, frame_hw=(64, 64), image_threshold=0.3, pixel_threshold=0.3, sigma=0.0, min_area=0)
    mask = None
    if case == "camera threshold below region threshold":
        kw.update(pixel_threshold=2.0)
    elif case == "peak smaller than min_area":
        kw.update(min_area=64)
    elif case == "topk score":
        kw.update(score_mode="topk", topk=1, pixel_threshold=1.5)
    else:
        mask = np.ones((16, 16), bool)
        mask[2, 2] = False  # the highest pixel is not inspected: the region is around the inspected peak
        kw.update(pixel_threshold=1.0)
    v = decide(m, mask, **kw)
    assert v.verdict == "FAIL" and len(v.regions) >= 1, v
    top = v.regions[0]
    peak_yx = (9, 5) if mask is not None else (2, 2)
    assert top.x <= peak_yx[1] * 4 < top.x + top.w and top.y <= peak_yx[0] * 4 < top.y + top.h
    assert "1 region" in v.reason


def test_fail_region_fuzz():
    """Random maps and thresholds: every FAIL has >= 1 region, whatever the settings."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        m = rng.gamma(1.0, 0.05, size=(rng.integers(1, 20), rng.integers(1, 20))).astype(np.float32)
        mask = rng.random(m.shape) > 0.3 if rng.random() < 0.5 else None
        v = decide(m, mask, stride=4, frame_hw=(m.shape[0] * 4, m.shape[1] * 4),
                   image_threshold=float(rng.uniform(0, 0.3)), pixel_threshold=float(rng.uniform(0, 1)),
                   score_mode=str(rng.choice(["max", "topk"])), topk=int(rng.integers(1, 50)),
                   sigma=float(rng.choice([0.0, 1.0])), min_area=int(rng.integers(0, 200)))
        if v.verdict == "FAIL":
            assert v.regions, v
