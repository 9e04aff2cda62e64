"""The per-frame hot path without allocations it can avoid: reused tile buffers (never handed out while a
frame still needs them), blend weights applied in place, the map down-scaled with OpenCV; each gives the
same numbers as the plain version."""

from __future__ import annotations

import numpy as np
import pytest

from edge_daemon.bench.pipeline import StandInEngine
from edge_daemon.worker import MapDownscaler, downscale_map
from inspection.batcher import TileBatcher
from inspection.fusion import fuse, fusion_layout
from inspection.pipeline import (
    TILE_BUFFERS,
    InspectConfig,
    TileBuffers,
    inspect_frame,
    model_geometry,
    prepare_frame,
)
from inspection.tiling import extract_tiles, tile_grid


@pytest.mark.parametrize("shape", [(512, 512), (511, 509), (7, 5), (1, 1)])
@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_map_downscaler_is_the_block_mean(shape, factor):
    m = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    got, want = MapDownscaler(factor)(m), downscale_map(m, factor)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tile_buffers_reuse_and_bounds():
    pool = TileBuffers(keep=2, max_bytes=3 * 1000)
    a = pool.take((10, 100), np.uint8)
    pool.give(a)
    assert pool.take((10, 100), np.uint8) is a and pool.idle_bytes == 0
    bufs = [pool.take((10, 100), np.uint8) for _ in range(4)]
    for b in bufs:
        pool.give(b)
    assert pool.idle_bytes == 2000  # keep=2 per shape
    pool.give(np.empty((20, 100), np.uint8))  # 2000 more bytes would pass max_bytes: freed instead
    assert pool.idle_bytes == 2000
    assert pool.take((10, 100), np.float32).dtype == np.float32  # another dtype: a new buffer


def test_fuse_consume_gives_the_same_map():
    grid = tile_grid(96, 128, 32, 32, 8, 4)
    layout = fusion_layout(grid, 8, 8)
    maps = np.random.default_rng(0).random((grid.count, 1, 8, 8), dtype=np.float32)
    want = fuse(maps.copy(), layout, "blend")
    np.testing.assert_array_equal(fuse(maps, layout, "blend", consume=True), want)


def test_tile_buffer_is_reused_and_results_do_not_leak_between_frames():
    engine = StandInEngine(tile=32, stride=4, channels=1, mode="pool", max_batch=8)
    config = InspectConfig(tile_overlap=8)
    geom = model_geometry(engine)
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 256, (96, 128), dtype=np.uint8) for _ in range(2))
    alone_b = inspect_frame(engine, b, config)
    pa = prepare_frame(a, geom, config)
    TILE_BUFFERS.give(pa.tiles)  # as finish_frame does once a's maps are back
    pb = prepare_frame(b, geom, config)
    assert pb.tiles is pa.tiles and pb.pooled  # the same memory, refilled with b's tiles
    np.testing.assert_array_equal(pb.tiles, extract_tiles(b[:, :, None], pb.grid))
    inspect_frame(engine, a, config)
    after_a = inspect_frame(engine, b, config)
    assert after_a.score == alone_b.score
    np.testing.assert_array_equal(after_a.anomaly_map, alone_b.anomaly_map)


def test_many_frames_in_flight_each_get_their_own_result():
    """Frames of different content in one batcher, more than a buffer pool keeps: every result equals the
    frame's result alone (a buffer given back too early would mix tiles of two frames)."""
    engine = StandInEngine(tile=32, stride=4, channels=1, mode="pool", max_batch=8, streams=2)
    config = InspectConfig(tile_overlap=8)
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (96, 128), dtype=np.uint8) for _ in range(12)]
    alone = [inspect_frame(engine, f, config) for f in frames]
    batcher = TileBatcher(engine, 8, 0)
    got = {}
    for round_ in range(3):
        for i, f in enumerate(frames):
            batcher.add((round_, i), "cam", f, config)
        got.update(dict(batcher.drain(10.0)))
    assert len(got) == 36
    for (_, i), result in got.items():
        assert result.score == alone[i].score
        np.testing.assert_array_equal(result.anomaly_map, alone[i].anomaly_map)
