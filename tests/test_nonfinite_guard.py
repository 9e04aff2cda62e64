"""A NaN/inf anomaly map never becomes PASS: decide(), the pipeline (NumPy and torch maps), the batcher."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch

from edge_daemon.bench.pipeline import StandInEngine
from edge_daemon.protocol import make_record
from inspection.batcher import TileBatcher
from inspection.pipeline import InspectConfig, finish_frame, inspect_frame, model_geometry, prepare_frame
from inspection.verdict import decide

BAD_VALUES = [np.nan, np.inf, -np.inf]


def _decide(m, mask=None):
    return decide(m, mask, stride=4, frame_hw=(m.shape[0] * 4, m.shape[1] * 4), image_threshold=0.5,
                  pixel_threshold=0.5, sigma=1.0)


@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
def test_inspected_nonfinite_pixel_fails_with_reason_and_region(value):
    m = np.zeros((16, 16), np.float32)
    m[5, 7] = value
    verdict = _decide(m)
    assert verdict.verdict == "FAIL" and verdict.score == math.inf
    assert "non-finite" in verdict.reason and "1 inspected pixels" in verdict.reason
    assert len(verdict.regions) == 1
    region = verdict.regions[0]
    assert (region.x, region.y, region.w, region.h) == (28, 20, 4, 4) and region.peak == math.inf


def test_all_nan_map_fails():
    verdict = _decide(np.full((8, 8), np.nan, np.float32))
    assert verdict.verdict == "FAIL" and verdict.score == math.inf and verdict.regions


def test_nan_outside_the_mask_does_not_leak_into_inspected_pixels():
    m = np.zeros((16, 16), np.float32)
    m[0:2, 0:2] = np.nan  # an ignore zone; smoothing would spread NaN into the inspected pixels
    mask = np.ones((16, 16), bool)
    mask[0:2, 0:2] = False
    verdict = _decide(m, mask)
    assert verdict.verdict == "PASS" and math.isfinite(verdict.score) and verdict.score == 0.0


def test_finite_maps_are_judged_as_before():
    m = np.zeros((16, 16), np.float32)
    m[4:10, 4:10] = 0.9
    verdict = _decide(m)
    assert verdict.verdict == "FAIL" and 0.85 < verdict.score <= 0.9
    assert "non-finite" not in verdict.reason and len(verdict.regions) == 1


class _PoisonEngine(StandInEngine):
    """Zeros everywhere except one map pixel of one tile, set to ``value``."""

    def __init__(self, value, tile_index=0, pixel=(3, 3), **kw):
        super().__init__(tile=32, stride=4, mode="zeros", **kw)
        self.value, self.tile_index, self.pixel = value, tile_index, pixel

    def infer(self, tiles):
        out = super().infer(tiles)
        out[min(self.tile_index, len(out) - 1), 0, self.pixel[0], self.pixel[1]] = self.value
        return out


@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
def test_pipeline_fails_a_frame_with_a_nonfinite_tile_map(value):
    frame = np.zeros((64, 64), np.uint8)
    result = inspect_frame(_PoisonEngine(value), frame, InspectConfig(tile_overlap=8, min_region_area=0))
    assert result.verdict == "FAIL" and result.score == math.inf and "non-finite" in result.reason
    assert result.regions


def test_pipeline_fails_nonfinite_values_in_an_ignore_zone():
    frame = np.zeros((64, 64), np.uint8)
    config = InspectConfig(tile_overlap=8, ignore_zones=((0, 0, 32, 32),))
    result = inspect_frame(_PoisonEngine(np.nan, pixel=(1, 1)), frame, config)
    assert result.verdict == "FAIL" and result.score == math.inf
    assert "outside the inspected pixels" in result.reason
    assert [(r.x, r.y, r.w, r.h) for r in result.regions] == [(0, 0, 64, 64)]  # every FAIL says where


def test_torch_maps_are_guarded_too():
    engine = _PoisonEngine(np.inf)
    config = InspectConfig(tile_overlap=8)
    geom = model_geometry(engine)
    prepared = prepare_frame(np.zeros((64, 64), np.uint8), geom, config)
    maps = torch.from_numpy(engine.infer(prepared.tiles))
    result = finish_frame(prepared, maps, geom, config, infer_ms=0.0)
    assert result.verdict == "FAIL" and result.score == math.inf


def test_batcher_path_fails_the_frame_and_the_record_encodes():
    engine = _PoisonEngine(np.nan, max_batch=4)
    batcher = TileBatcher(engine, max_batch=4, max_delay_us=0)
    batcher.add("t0", "cam", np.zeros((64, 64), np.uint8), InspectConfig(tile_overlap=8))
    (ticket, outcome), = batcher.drain(5.0)
    assert ticket == "t0" and outcome.verdict == "FAIL" and outcome.score == math.inf
    record = make_record("verdict", "cam", 0, verdict=outcome.verdict, reason=outcome.reason,
                         score=outcome.score, threshold=outcome.threshold)
    assert msgpack.unpackb(msgpack.packb(record))["score"] == math.inf
