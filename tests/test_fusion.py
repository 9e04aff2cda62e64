"""Fusion: partition of unity, exact reconstruction, tiled == untiled, no seams on a real image."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TinyCore

from edge_daemon.bench.pipeline import DoneHandle, StandInEngine
from engines.bundle import read_bundle
from engines.graph import DeployModel
from inspection.fusion import fuse, fuse_torch, fusion_layout, ramp_window, upsample_map
from inspection.pipeline import InspectConfig, inspect_frame
from inspection.tiling import tile_grid


class OrtAdapter:
    """Minimal Engine-protocol adapter over onnxruntime for the tiny bundle (synchronous)."""

    backend, device, precision, streams = "onnxruntime", "cpu", "fp32", 1

    def __init__(self, bundle_dir: Path, max_batch: int = 256):
        self.meta = read_bundle(bundle_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(Path(bundle_dir) / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.max_batch = max_batch

    @property
    def input_shape(self):
        return self.meta.input.height, self.meta.input.width, self.meta.input.channels

    @property
    def map_shape(self):
        return self.meta.map.height, self.meta.map.width

    def infer(self, tiles):
        return self.session.run(None, {"tiles": np.ascontiguousarray(tiles)})[0]

    def submit(self, tiles, slot=0):
        return DoneHandle(self.infer(tiles))


def _cut(field: np.ndarray, layout) -> np.ndarray:
    """Tile maps of a map-scale field, as a perfect model would return them."""
    h, w = layout.map_h, layout.map_w
    return np.stack([field[y:y + h, x:x + w] for y, x in zip(layout.ys, layout.xs, strict=True)])[:, None]


@pytest.mark.parametrize("length, ramp", [(16, 4), (8, 4), (7, 3), (10, 0), (5, 5)])
def test_ramp_window_positive_symmetric(length, ramp):
    window = ramp_window(length, ramp)
    assert window.shape == (length,) and (window > 0).all() and (window <= 1).all()
    np.testing.assert_allclose(window, window[::-1])
    if ramp and length >= 2 * ramp:  # two ramps overlapping by exactly `ramp` sum to 1
        np.testing.assert_allclose(window[:ramp] + window[length - ramp:], 1.0)


@pytest.mark.parametrize("height, width, overlap", [(32, 32, 0), (96, 160, 8), (100, 132, 4), (64, 64, 28),
                                                    (256, 64, 1)])
def test_weights_sum_to_one(height, width, overlap):
    layout = fusion_layout(tile_grid(height, width, 32, 32, overlap, 4), 8, 8)
    assert (layout.weights > 0).all()
    total = fuse(np.ones((layout.count, 1, 8, 8), np.float32), layout, "blend")
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)


@pytest.mark.parametrize("mode", ["blend", "max"])
@pytest.mark.parametrize("height, width, overlap", [(96, 160, 8), (100, 132, 4), (48, 300, 20)])
def test_constant_and_linear_fields_come_back(mode, height, width, overlap):
    layout = fusion_layout(tile_grid(height, width, 32, 32, overlap, 4), 8, 8)
    yy, xx = np.mgrid[0:layout.out_h, 0:layout.out_w].astype(np.float32)
    for field in (np.full_like(yy, 0.37), 0.01 * yy - 0.02 * xx + 0.5):
        fused = fuse(_cut(field, layout), layout, mode)
        np.testing.assert_allclose(fused, field, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["blend", "max"])
def test_fuse_torch_matches_numpy(mode):
    layout = fusion_layout(tile_grid(100, 132, 32, 32, 12, 4), 8, 8)
    maps = np.random.default_rng(0).random((layout.count, 1, 8, 8), dtype=np.float32)
    expected = fuse(maps, layout, mode)
    got = fuse_torch(torch.from_numpy(maps), layout, mode)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_fuse_rejects_wrong_maps():
    layout = fusion_layout(tile_grid(64, 64, 32, 32, 8, 4), 8, 8)
    with pytest.raises(ValueError, match="tile maps must be"):
        fuse(np.zeros((layout.count + 1, 1, 8, 8), np.float32), layout)
    with pytest.raises(ValueError, match="fusion must be"):
        fuse(np.zeros((layout.count, 1, 8, 8), np.float32), layout, "mean")


def test_upsample_map_shape_and_values():
    small = np.arange(12, dtype=np.float32).reshape(3, 4)
    big = upsample_map(small, 4, 10, 15)
    assert big.shape == (10, 15)
    assert big.min() >= small.min() and big.max() <= small.max()
    # pixel centres aligned: frame pixel x sits at map coordinate (x + 0.5) / 4 - 0.5 (linear in x)
    xs = (np.arange(2, 13) + 0.5) / 4 - 0.5
    row = (6 + 0.5) / 4 - 0.5
    np.testing.assert_allclose(big[6, 2:13], 4 * row + xs, rtol=1e-5)  # small[r, x] = 4 r + x


@pytest.mark.parametrize("fusion", ["blend", "max"])
def test_stand_in_model_same_tiled_and_untiled(fusion):
    """4x4 average pooling is translation-equivariant at stride 4: tiling must not change the map."""
    engine = StandInEngine(tile=32, stride=4, channels=1, mode="pool", max_batch=64)
    frame = np.random.default_rng(5).integers(0, 256, (150, 203), dtype=np.uint8)
    result = inspect_frame(engine, frame, InspectConfig(tile_overlap=8, fusion=fusion, smoothing_sigma=0))
    padded = np.pad(frame, ((0, 2), (0, 1)), mode="reflect").astype(np.float32)
    expected = padded.reshape(38, 4, 51, 4).mean(axis=(1, 3)) / 255.0
    assert result.anomaly_map.shape == (38, 51)
    np.testing.assert_allclose(result.anomaly_map, expected, rtol=1e-5, atol=1e-6)


def _untiled_reference(frame: np.ndarray, meta) -> np.ndarray:
    """The tiny bundle's model run on the whole frame at once (same weights: TinyCore seeds itself)."""
    h, w = frame.shape
    spec = type(meta.map)(**{**meta.map.__dict__, "height": h // 4, "width": w // 4})
    model = DeployModel(TinyCore(), meta.input, spec).eval()
    with torch.no_grad():
        return model(torch.from_numpy(frame)[None, :, :, None]).numpy()[0, 0]


def _tile_edge_mask(grid, shape, stride, margin=1):
    """Map pixels within ``margin`` of any tile edge (where zero padding makes tiles disagree)."""
    near = np.zeros(shape, dtype=bool)
    th, tw = grid.tile_h // stride, grid.tile_w // stride
    for y in grid.ys:
        for x in grid.xs:
            ym, xm = y // stride, x // stride
            for edge in (ym, ym + th - margin):
                near[max(edge, 0):edge + margin, xm:xm + tw] = True
            for edge in (xm, xm + tw - margin):
                near[ym:ym + th, max(edge, 0):edge + margin] = True
    return near


@pytest.fixture(scope="module")
def elpv_module() -> np.ndarray:
    """Four ELPV solar cells (300 x 300 mono8) tiled 2 x 2 into a 600 x 600 module, cropped to 592."""
    import elpv_dataset

    folder = Path(elpv_dataset.__file__).parent / "data" / "images"
    cells = [cv2.imread(str(folder / f"cell{i:04d}.png"), cv2.IMREAD_GRAYSCALE) for i in (1, 2, 3, 4)]
    assert all(c is not None and c.shape == (300, 300) for c in cells)
    module = np.block([[cells[0], cells[1]], [cells[2], cells[3]]])
    return np.ascontiguousarray(module[:592, :592])


def test_real_model_tiled_matches_untiled_on_elpv(tiny_bundle, elpv_module):
    engine = OrtAdapter(tiny_bundle)
    config = InspectConfig(tile_overlap=8, smoothing_sigma=0)
    tiled = inspect_frame(engine, elpv_module, config).anomaly_map
    reference = _untiled_reference(elpv_module, engine.meta)
    assert tiled.shape == reference.shape == (148, 148)
    grid = tile_grid(592, 592, 32, 32, 8, 4)
    clean = ~_tile_edge_mask(grid, tiled.shape, 4)
    clean[[0, -1], :] = clean[:, [0, -1]] = False  # the frame border differs by construction
    assert clean.mean() > 0.3
    # away from tile edges every map pixel is blended from tiles that all see the same pixels
    np.testing.assert_allclose(tiled[clean], reference[clean], rtol=1e-4, atol=1e-5)


def _seam_step(fmap: np.ndarray, columns: list[int]) -> float:
    """Mean |difference| between map columns c-1 and c, over the given columns."""
    return float(np.mean([np.abs(fmap[:, c] - fmap[:, c - 1]).mean() for c in columns]))


def test_no_seams_on_elpv_module(tiny_bundle, elpv_module):
    """Steps across tile boundaries: blended tiling vs the untiled model, and vs naive no-overlap tiling."""
    engine = OrtAdapter(tiny_bundle)
    blended = inspect_frame(engine, elpv_module, InspectConfig(tile_overlap=16, smoothing_sigma=0))
    naive = inspect_frame(engine, elpv_module, InspectConfig(tile_overlap=0, smoothing_sigma=0))
    blended, naive = blended.anomaly_map, naive.anomaly_map
    reference = _untiled_reference(elpv_module, engine.meta)
    naive_edges = [x // 4 for x in tile_grid(592, 592, 32, 32, 0, 4).xs[1:]]  # where naive tiles meet
    blend_grid = tile_grid(592, 592, 32, 32, 16, 4)
    blend_edges = sorted({x // 4 for x in blend_grid.xs[1:]} | {x // 4 + 8 for x in blend_grid.xs[:-1]})
    ref_naive, got_naive = _seam_step(reference, naive_edges), _seam_step(naive, naive_edges)
    ref_blend, got_blend = _seam_step(reference, blend_edges), _seam_step(blended, blend_edges)
    print(f"seam step: untiled {ref_blend:.5f}, blended {got_blend:.5f} (at blended tile edges); "
          f"untiled {ref_naive:.5f}, naive {got_naive:.5f} (at naive tile edges)")
    assert got_naive > 1.2 * ref_naive  # the metric does see seams when tiles are simply abutted
    # blending leaves almost no step beyond the image's own (tile edge pixels keep a small, non-zero weight)
    assert got_blend - ref_blend < 0.05 * (got_naive - ref_naive)
    assert got_blend < 1.3 * ref_blend
    assert np.abs(blended - reference)[2:-2, 2:-2].max() < 0.25 * np.abs(naive - reference)[2:-2, 2:-2].max()
