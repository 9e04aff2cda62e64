"""Tiling geometry, input conversion and tile extraction."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inspection.tiling import (
    align_roi,
    axis_starts,
    extract_tiles,
    extract_tiles_torch,
    inspect_mask,
    pad_to,
    padded_size,
    tile_grid,
    to_channels,
)


def _check_axis(starts, length, tile, overlap, stride):
    assert starts[0] == 0 and starts[-1] == length - tile
    assert all(s % stride == 0 for s in starts)
    gaps = np.diff(starts)
    if len(gaps):
        assert (gaps > 0).all()
        assert (tile - gaps >= overlap).all()  # neighbours overlap by at least the minimum
        assert gaps.max() - gaps.min() <= stride  # spread evenly


@settings(max_examples=300, deadline=None)
@given(stride=st.sampled_from([1, 2, 4, 8]), tile_units=st.integers(2, 40), data=st.data())
def test_axis_starts_properties(stride, tile_units, data):
    tile = tile_units * stride
    overlap = data.draw(st.integers(0, tile - stride))
    length = data.draw(st.integers(tile // stride, 30 * tile // stride)) * stride
    starts = axis_starts(length, tile, overlap, stride)
    _check_axis(starts, length, tile, overlap, stride)
    # as few tiles as the overlap allows
    step_max = (tile - overlap) // stride * stride
    assert len(starts) == 1 + -(-(length - tile) // step_max)


@pytest.mark.parametrize("length, tile, overlap, expected", [
    (256, 256, 32, (0,)),  # one tile, exact
    (512, 256, 0, (0, 256)),  # exact multiple, no overlap
    (480, 256, 32, (0, 224)),  # exact multiple of the step
    (257, 256, 1, (0, 1)),  # 1-pixel overlap, tiny remainder
])
def test_axis_starts_cases(length, tile, overlap, expected):
    assert axis_starts(length, tile, overlap) == expected


def test_axis_starts_rejects_bad_geometry():
    with pytest.raises(ValueError, match="tile_overlap"):
        axis_starts(512, 64, 61, stride=4)  # no aligned grid keeps 61 px of overlap
    with pytest.raises(ValueError, match="multiple of the stride"):
        axis_starts(514, 64, 8, stride=4)
    with pytest.raises(ValueError, match="multiple of the map stride"):
        axis_starts(512, 66, 8, stride=4)


def test_padded_size():
    assert padded_size(5, 32, 4) == 32  # smaller than a tile
    assert padded_size(1001, 32, 4) == 1004  # odd size -> next multiple of the stride
    assert padded_size(1024, 32, 4) == 1024


def test_grid_is_cached_and_covers_the_frame():
    grid = tile_grid(1004, 2048, 256, 256, 32, 4)
    assert grid is tile_grid(1004, 2048, 256, 256, 32, 4)
    cover = np.zeros((grid.height, grid.width), dtype=np.int32)
    for y, x in grid.starts:
        cover[y:y + 256, x:x + 256] += 1
    assert cover.min() >= 1
    assert grid.count == len(grid.ys) * len(grid.xs)


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (65, 129, 1), (23, 31, 3)])
def test_extract_tiles_matches_slicing(shape):
    rng = np.random.default_rng(1)
    frame = to_channels(rng.integers(0, 256, shape, dtype=np.uint8), shape[2] if len(shape) == 3 else 1)
    h, w = padded_size(frame.shape[0], 16, 4), padded_size(frame.shape[1], 16, 4)
    area = pad_to(frame, h, w)
    grid = tile_grid(h, w, 16, 16, 1, 4)
    tiles = extract_tiles(area, grid)
    assert tiles.flags.c_contiguous and tiles.dtype == np.uint8
    assert tiles.shape == (grid.count, 16, 16, frame.shape[2])
    for k, (y, x) in enumerate(grid.starts):
        np.testing.assert_array_equal(tiles[k], area[y:y + 16, x:x + 16])
    out = np.empty_like(tiles)
    assert extract_tiles(area, grid, out=out) is out
    np.testing.assert_array_equal(out, tiles)


def test_tiny_frame_is_reflect_padded():
    frame = np.arange(15, dtype=np.uint8).reshape(3, 5, 1)
    area = pad_to(frame, 8, 8)
    np.testing.assert_array_equal(area[:3, :5], frame)
    np.testing.assert_array_equal(area[3, :5], frame[1, :])  # reflection, edge not repeated
    np.testing.assert_array_equal(area[:3, 5], frame[:, 3])
    one = pad_to(np.full((1, 1, 1), 7, np.uint8), 4, 4)
    assert (one == 7).all()


def test_extract_tiles_torch_matches_numpy():
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (100, 140, 3), dtype=np.uint8)
    grid = tile_grid(100, 140, 32, 32, 8, 4)
    expected = extract_tiles(frame, grid)
    got = extract_tiles_torch(torch.from_numpy(frame), grid)
    assert got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), expected)


def test_to_channels_conversions():
    rng = np.random.default_rng(3)
    mono = rng.integers(0, 256, (10, 12), dtype=np.uint8)
    assert to_channels(mono, 1).shape == (10, 12, 1)
    assert np.shares_memory(to_channels(mono, 1), mono)  # no copy for the common case
    rgb_of_mono = to_channels(mono[:, :, None], 3)
    assert rgb_of_mono.shape == (10, 12, 3) and (rgb_of_mono == mono[:, :, None]).all()
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_channels(rgb, 1)[:, :, 0], cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    np.testing.assert_array_equal(to_channels(rgb, 3), rgb)
    mono16 = rng.integers(0, 65536, (10, 12), dtype=np.uint16)
    np.testing.assert_array_equal(to_channels(mono16, 1)[:, :, 0], (mono16 >> 8).astype(np.uint8))
    twelve_bit = np.array([[0, 16, 4095]], dtype=np.uint16)
    np.testing.assert_array_equal(to_channels(twelve_bit, 1, mono16_shift=4)[:, :, 0], [[0, 1, 255]])
    saturated = to_channels(twelve_bit, 1, mono16_shift=3)[:, :, 0]
    np.testing.assert_array_equal(saturated, [[0, 2, 255]])  # 4095 >> 3 = 511 saturates


@pytest.mark.parametrize("frame, match", [
    (np.zeros((4, 4), np.float32), "dtype"),
    (np.zeros((4, 4, 2), np.uint8), "shape"),
    (np.zeros((0, 4), np.uint8), "empty"),
    (np.zeros((2, 3, 4, 1), np.uint8), "shape"),
    ([[1, 2]], "NumPy"),
])
def test_to_channels_rejects(frame, match):
    with pytest.raises(ValueError, match=match):
        to_channels(frame, 1)


def test_align_roi_and_mask():
    assert align_roi(None, 100, 200, 4) == (0, 100, 0, 200)
    assert align_roi((10, 6, 50, 20), 100, 200, 4) == (4, 26, 8, 60)
    assert align_roi((190, 90, 50, 50), 100, 200, 4) == (88, 100, 188, 200)  # clipped to the frame
    with pytest.raises(ValueError, match="does not intersect"):
        align_roi((300, 0, 10, 10), 100, 200, 4)
    assert inspect_mask(25, 50, 4, None, ()) is None
    mask = inspect_mask(25, 50, 4, (10, 6, 50, 20), ((12, 8, 4, 4),))
    expected = np.zeros((25, 50), bool)
    expected[1:7, 2:15] = True  # map pixels overlapping frame rows 6..25, cols 10..59
    expected[2:3, 3:4] = False  # the ignore zone covers map pixel (2, 3) only
    np.testing.assert_array_equal(mask, expected)
    assert not mask.flags.writeable
