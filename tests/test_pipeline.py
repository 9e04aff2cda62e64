"""InspectConfig validation and inspect_frame end to end (stand-in engine, real ONNX Runtime engine)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edge_daemon.bench.pipeline import StandInEngine
from inspection.pipeline import (
    InspectConfig,
    finish_frame,
    infer_all,
    inspect_frame,
    model_geometry,
    prepare_frame,
)
from inspection.tiling import tile_grid


def _defect_frame(height=200, width=260, dtype=np.uint8) -> np.ndarray:
    frame = np.full((height, width), 20, dtype=np.uint8)
    frame[120:140, 180:204] = 250  # a bright 20 x 24 defect
    return frame.astype(dtype) * (257 if dtype == np.uint16 else 1)


@pytest.fixture
def engine():
    # pool: map = mean of each 4x4 block / 255; threshold 0.5: defect (0.98) fails, background (0.08) passes
    return StandInEngine(tile=32, stride=4, channels=1, mode="pool", max_batch=16)


# ---- config ------------------------------------------------------------------------------------------
def test_config_defaults_and_mapping():
    cfg = InspectConfig.from_mapping({"tile_overlap": 8, "roi": [1, 2, 30, 40], "fusion": "max",
                                      "ignore_zones": [[0, 0, 4, 4]], "image_threshold": 1})
    assert cfg.roi == (1, 2, 30, 40) and cfg.ignore_zones == ((0, 0, 4, 4),)
    assert cfg.image_threshold == 1.0 and isinstance(cfg.image_threshold, float)
    assert InspectConfig.from_mapping({}) == InspectConfig()
    per_camera = dataclasses.replace(cfg, image_threshold=0.7)
    assert per_camera.image_threshold == 0.7 and per_camera.tile_overlap == 8
    hash(per_camera)  # frozen and hashable (grids and masks are cached on it)


@pytest.mark.parametrize("mapping, message", [
    ({"tile_overlap": "x"}, "inspection.tile_overlap: must be an int >= 0, got 'x'"),
    ({"tile_overlap": True}, "inspection.tile_overlap: must be an int"),
    ({"fusion": "mean"}, "inspection.fusion: must be one of blend, max, got 'mean'"),
    ({"score": 3}, "inspection.score: must be one of"),
    ({"topk": 0}, "inspection.topk: must be an int >= 1"),
    ({"smoothing_sigma": -1}, "inspection.smoothing_sigma: must be a finite number"),
    ({"image_threshold": "high"}, "inspection.image_threshold: must be a finite number or null"),
    ({"pixel_threshold": float("nan")}, "inspection.pixel_threshold"),
    ({"roi": [0, 0, 0, 10]}, "inspection.roi: must be [x, y, w, h]"),
    ({"ignore_zones": [[0, 0, 4, 4], [1, 2]]}, r"inspection.ignore_zones\[1\]: must be"),
    ({"mono16_shift": 9}, "inspection.mono16_shift: must be an int in 0..8"),
    ({"max_batch": 0}, "inspection.max_batch"),
    ({"max_delay_us": -5}, "inspection.max_delay_us"),
    ({"tile_overlapp": 8}, "inspection.tile_overlapp: unknown key"),
])
def test_config_errors_name_the_key(mapping, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")
                       if "\\" not in message else message):
        InspectConfig.from_mapping(mapping)


def test_config_direct_construction_is_validated():
    with pytest.raises(ValueError, match="InspectConfig.topk"):
        InspectConfig(topk=-1)


# ---- inspect_frame ------------------------------------------------------------------------------------
def test_defect_fails_with_its_region(engine):
    result = inspect_frame(engine, _defect_frame(), InspectConfig(tile_overlap=8, smoothing_sigma=0))
    assert result.verdict == "FAIL" and result.threshold == 0.5
    assert result.score == pytest.approx(250 / 255, rel=1e-5)
    assert result.reason.startswith("score 0.98") and "1 region" in result.reason
    (region,) = result.regions
    assert (region.x, region.y, region.w, region.h) == (180, 120, 24, 20)
    assert region.area == 480
    assert result.anomaly_map.shape == (50, 65) and result.anomaly_map.dtype == np.float32
    assert set(result.timings_ms) == {"tile", "infer", "fuse", "verdict"}
    assert all(v >= 0 for v in result.timings_ms.values())


def test_clean_frame_passes(engine):
    result = inspect_frame(engine, np.full((200, 260), 20, np.uint8), InspectConfig(tile_overlap=8))
    assert result.verdict == "PASS" and result.regions == [] and "below threshold" in result.reason


@pytest.mark.parametrize("config", [
    InspectConfig(tile_overlap=8, roi=(0, 0, 150, 200)),  # defect outside the ROI
    InspectConfig(tile_overlap=8, ignore_zones=((170, 110, 50, 40),)),  # defect inside an ignore zone
    InspectConfig(tile_overlap=8, image_threshold=0.99, pixel_threshold=0.99),  # per-camera override
])
def test_roi_ignore_zones_and_threshold_override(engine, config):
    result = inspect_frame(engine, _defect_frame(), config)
    assert result.verdict == "PASS", result.reason
    if config.roi or config.ignore_zones:
        assert result.anomaly_map[30:35, 45:51].max() == 0.0  # not inspected -> 0 in the map


def test_roi_keeps_results_in_frame_coordinates(engine):
    frame = _defect_frame()
    full = inspect_frame(engine, frame, InspectConfig(tile_overlap=8, smoothing_sigma=0))
    full_tiles = sum(engine.calls)
    config = InspectConfig(tile_overlap=8, smoothing_sigma=0, roi=(101, 90, 150, 70))
    roi = inspect_frame(engine, frame, config)
    assert sum(engine.calls) - full_tiles < full_tiles / 3  # only the ROI is tiled
    assert roi.verdict == "FAIL" and len(roi.regions) == len(full.regions) == 1
    a, b = roi.regions[0], full.regions[0]
    assert (a.x, a.y, a.w, a.h, a.area) == (b.x, b.y, b.w, b.h, b.area)
    assert a.peak == pytest.approx(b.peak, rel=1e-6) and a.mean == pytest.approx(b.mean, rel=1e-6)
    np.testing.assert_allclose(roi.anomaly_map[23:40, 26:62], full.anomaly_map[23:40, 26:62], atol=1e-6)
    assert roi.anomaly_map[:20].max() == 0.0  # rows above the ROI are not inspected


@pytest.mark.parametrize("convert", [
    lambda f: f,
    lambda f: f[:, :, None],
    lambda f: (f.astype(np.uint16) << 8),  # mono16, default shift 8
    lambda f: np.repeat(f[:, :, None], 3, axis=2),  # RGB into a mono model
])
def test_input_formats_give_the_same_verdict(engine, convert):
    frame = _defect_frame()
    expected = inspect_frame(engine, frame, InspectConfig(tile_overlap=8))
    got = inspect_frame(engine, convert(frame), InspectConfig(tile_overlap=8))
    assert got.verdict == expected.verdict == "FAIL"
    np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, atol=1 / 255)


def test_rgb_model_gets_mono_replicated():
    rgb_engine = StandInEngine(tile=32, stride=4, channels=3, mode="pool", max_batch=16)
    result = inspect_frame(rgb_engine, _defect_frame(), InspectConfig(tile_overlap=8, smoothing_sigma=0))
    assert result.verdict == "FAIL" and result.score == pytest.approx(250 / 255, rel=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (32, 32), (33, 31), (31, 97)])
def test_tiny_and_odd_frames(engine, shape):
    frame = np.random.default_rng(1).integers(0, 100, shape, dtype=np.uint8)
    result = inspect_frame(engine, frame, InspectConfig(tile_overlap=1, min_region_area=0))
    assert result.anomaly_map.shape == (-(-shape[0] // 4), -(-shape[1] // 4))
    assert result.verdict == "PASS"


def test_bad_frames_raise_value_error(engine):
    with pytest.raises(ValueError, match="dtype"):
        inspect_frame(engine, np.zeros((64, 64), np.float32), InspectConfig(tile_overlap=8))
    with pytest.raises(ValueError, match="does not intersect"):
        inspect_frame(engine, np.zeros((64, 64), np.uint8), InspectConfig(roi=(100, 100, 5, 5)))
    with pytest.raises(ValueError, match="tile_overlap"):
        inspect_frame(engine, np.zeros((64, 64), np.uint8), InspectConfig(tile_overlap=30))


def test_tiles_are_inferred_in_chunks_of_max_batch(engine):
    inspect_frame(engine, np.zeros((200, 260), np.uint8), InspectConfig(tile_overlap=8))
    assert max(engine.calls) == engine.max_batch
    assert sum(engine.calls) == tile_grid(200, 260, 32, 32, 8, 4).count


def test_torch_path_matches_numpy_path(engine):
    """The device path (gather + fuse in torch) run on CPU tensors gives the NumPy path's result."""
    frame, config = _defect_frame(), InspectConfig(tile_overlap=8)
    geom = model_geometry(engine)
    expected = inspect_frame(engine, frame, config)
    prepared = prepare_frame(frame, geom, config, device="cpu")
    assert isinstance(prepared.tiles, torch.Tensor)
    maps = torch.from_numpy(infer_all(engine, prepared.tiles.numpy()))
    got = finish_frame(prepared, maps, geom, config, infer_ms=0.0)
    assert got.verdict == expected.verdict and len(got.regions) == len(expected.regions) == 1
    np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gather_and_fuse_match_cpu(engine):
    frame, config = _defect_frame(), InspectConfig(tile_overlap=8)
    geom = model_geometry(engine)
    expected = inspect_frame(engine, frame, config)
    prepared = prepare_frame(frame, geom, config, device="cuda:0")
    maps = torch.from_numpy(infer_all(engine, prepared.tiles.cpu().numpy())).to("cuda:0")
    got = finish_frame(prepared, maps, geom, config, infer_ms=0.0)
    np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, rtol=1e-5, atol=1e-6)


def test_real_onnxruntime_engine(tiny_bundle):
    registry = pytest.importorskip("engines.registry")
    real = registry.open_engine(tiny_bundle, backend="onnxruntime", streams=1, max_batch=8, threads=1)
    try:
        frame = np.random.default_rng(2).integers(0, 256, (90, 130), dtype=np.uint8)
        result = inspect_frame(real, frame, InspectConfig(tile_overlap=8))
        assert result.anomaly_map.shape == (23, 33) and np.isfinite(result.anomaly_map).all()
        assert result.threshold == real.meta.image_threshold
        assert result.verdict == ("FAIL" if result.score >= result.threshold else "PASS")
    finally:
        real.close()
