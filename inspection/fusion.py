"""Fusion: tile anomaly maps -> one seamless frame map at the model's output scale (pure functions).

Tile starts are multiples of the map stride (see tiling.py), so tile ``k`` at frame start (y, x) covers map
pixels [y/stride, y/stride + h) x [x/stride, x/stride + w) exactly: fusion never resamples.

blend  Each tile map is weighted by a separable window that ramps up over the overlap with a raised-cosine
       ``0.5 - 0.5 cos(pi (k + 0.5) / r)`` (never exactly zero; r = smallest overlap between neighbours on
       that axis, in map pixels), and the weighted sum is divided by the summed weights. Because the grid is a
       product of row starts and column starts, the summed weights are separable too, so each tile gets a
       pre-normalised weight (cached per geometry) and fusion is one multiply plus one add per map pixel.
       Where two tiles overlap by exactly r the ramps sum to 1 (a partition of unity): a tile's border
       pixels, where its padding effects live, get almost no weight. A constant or linear field comes back
       unchanged.
max    Per pixel maximum over the tiles that cover it (conservative: a defect seen by any tile is kept).

``upsample_map`` resizes a fused map to frame pixels, once, only when a caller asks for it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .tiling import TileGrid

__all__ = ["FUSION_MODES", "FusionLayout", "fusion_layout", "ramp_window", "fuse", "fuse_torch",
           "upsample_map"]

FUSION_MODES = ("blend", "max")


@dataclass(frozen=True, eq=False)  # hashed by identity: layouts are cached and reused
class FusionLayout:
    map_h: int  # one tile's map
    map_w: int
    out_h: int  # fused map of the padded area
    out_w: int
    ys: tuple[int, ...]  # tile starts in map pixels, one per tile (row-major)
    xs: tuple[int, ...]
    weights: np.ndarray  # count x map_h x map_w float32, summing to 1 over tiles at every pixel (read-only)

    @property
    def count(self) -> int:
        return len(self.ys)


def ramp_window(length: int, ramp: int) -> np.ndarray:
    """1-D window of ``length``: raised-cosine ramps of ``ramp`` samples at both ends, 1 in between, > 0."""
    window = np.ones(length, dtype=np.float64)
    if ramp <= 0:
        return window
    k = np.arange(length, dtype=np.float64)
    up = 0.5 - 0.5 * np.cos(np.pi * (np.minimum(k, ramp - 1) + 0.5) / ramp)
    up[k >= ramp] = 1.0
    return np.minimum(up, up[::-1])


def _axis_weights(starts: tuple[int, ...], tile_map: int, total: int) -> np.ndarray:
    """Per-tile 1-D weights along one axis (n x tile_map), normalised so they sum to 1 at every position."""
    if len(starts) > 1:
        ramp = min(tile_map - (b - a) for a, b in zip(starts, starts[1:], strict=False))
    else:
        ramp = 0
    window = ramp_window(tile_map, max(ramp, 0))
    summed = np.zeros(total, dtype=np.float64)
    for start in starts:
        summed[start:start + tile_map] += window
    return np.stack([window / summed[start:start + tile_map] for start in starts])


@functools.lru_cache(maxsize=64)
def fusion_layout(grid: TileGrid, map_h: int, map_w: int) -> FusionLayout:
    """Weights and map-scale starts for fusing ``grid``'s tile maps (map_h x map_w each). Cached."""
    s = grid.stride
    if map_h * s != grid.tile_h or map_w * s != grid.tile_w:
        raise ValueError(f"tile maps of {map_h}x{map_w} at stride {s} do not match "
                         f"{grid.tile_h}x{grid.tile_w} tiles")
    out_h, out_w = grid.height // s, grid.width // s
    ys_m = tuple(y // s for y in grid.ys)
    xs_m = tuple(x // s for x in grid.xs)
    wy = _axis_weights(ys_m, map_h, out_h)
    wx = _axis_weights(xs_m, map_w, out_w)
    weights = (wy[:, None, :, None] * wx[None, :, None, :]).astype(np.float32)
    weights = weights.reshape(len(ys_m) * len(xs_m), map_h, map_w)
    weights.flags.writeable = False
    tile_ys = tuple(y for y in ys_m for _ in xs_m)
    tile_xs = tuple(x for _ in ys_m for x in xs_m)
    return FusionLayout(map_h, map_w, out_h, out_w, tile_ys, tile_xs, weights)


def _check_maps(maps, layout: FusionLayout) -> None:
    expected = (layout.count, 1, layout.map_h, layout.map_w)
    if tuple(maps.shape) != expected:
        raise ValueError(f"tile maps must be {' x '.join(map(str, expected))}, got "
                         f"{' x '.join(map(str, maps.shape))}")


def fuse(maps: np.ndarray, layout: FusionLayout, mode: str = "blend", consume: bool = False) -> np.ndarray:
    """count x 1 x h x w tile maps -> out_h x out_w float32 fused map (a new array).

    ``consume=True``: the maps may be overwritten (blend weights them in place instead of in a temporary
    of the same size)."""
    _check_maps(maps, layout)
    h, w = layout.map_h, layout.map_w
    if mode == "blend":
        out = np.zeros((layout.out_h, layout.out_w), dtype=np.float32)
        tiles = maps[:, 0]
        if consume and tiles.dtype == np.float32 and tiles.flags.writeable:
            weighted = np.multiply(tiles, layout.weights, out=tiles)
        else:
            weighted = tiles * layout.weights
        for k, (y, x) in enumerate(zip(layout.ys, layout.xs, strict=True)):
            view = out[y:y + h, x:x + w]
            view += weighted[k]
    elif mode == "max":
        out = np.full((layout.out_h, layout.out_w), -np.inf, dtype=np.float32)
        for k, (y, x) in enumerate(zip(layout.ys, layout.xs, strict=True)):
            view = out[y:y + h, x:x + w]
            np.maximum(view, maps[k, 0], out=view)
    else:
        raise ValueError(f"fusion must be one of {FUSION_MODES}, got {mode!r}")
    return out


@functools.lru_cache(maxsize=64)
def _flat_index(layout: FusionLayout) -> np.ndarray:
    rows = np.asarray(layout.ys)[:, None, None] + np.arange(layout.map_h)[None, :, None]
    cols = np.asarray(layout.xs)[:, None, None] + np.arange(layout.map_w)[None, None, :]
    return (rows * layout.out_w + cols).reshape(-1)


@functools.lru_cache(maxsize=16)
def _device_tensors(layout: FusionLayout, device: str):
    import torch

    index = torch.as_tensor(_flat_index(layout), device=device)
    weights = torch.as_tensor(np.array(layout.weights), device=device)
    return index, weights


def fuse_torch(maps, layout: FusionLayout, mode: str = "blend"):
    """Torch version of ``fuse`` on the maps' device: one scatter kernel (index_add / amax)."""
    import torch

    _check_maps(maps, layout)
    index, weights = _device_tensors(layout, str(maps.device))
    maps = maps[:, 0].float()
    size = layout.out_h * layout.out_w
    if mode == "blend":
        out = torch.zeros(size, dtype=torch.float32, device=maps.device)
        out.index_add_(0, index, (maps * weights).reshape(-1))
    elif mode == "max":
        out = torch.full((size,), float("-inf"), dtype=torch.float32, device=maps.device)
        out.scatter_reduce_(0, index, maps.reshape(-1), reduce="amax")
    else:
        raise ValueError(f"fusion must be one of {FUSION_MODES}, got {mode!r}")
    return out.view(layout.out_h, layout.out_w)


def upsample_map(anomaly_map: np.ndarray, stride: int, frame_h: int, frame_w: int) -> np.ndarray:
    """Map at output scale -> frame pixels (bilinear, pixel centres aligned), cropped to frame_h x frame_w."""
    import cv2

    h, w = anomaly_map.shape
    if stride == 1:
        return anomaly_map[:frame_h, :frame_w].copy()
    big = cv2.resize(anomaly_map, (w * stride, h * stride), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(big[:frame_h, :frame_w])
