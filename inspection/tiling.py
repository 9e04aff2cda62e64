"""Tiling: frame geometry, input conversion and tile extraction (pure functions, no engine, no I/O).

Geometry
- A grid covers a (padded) frame exactly: starts spread evenly, first at 0, last flush with the edge.
- Every start is a multiple of the model's map ``stride``, so each tile's map lands on whole pixels of the
  frame map (no resampling). To make that always possible the inspected area is padded by reflection at the
  bottom/right up to a multiple of the stride (and up to one tile when it is smaller than a tile); the frame
  map keeps ``ceil(size / stride)`` pixels, the last one partly covering reflected pixels. Padding costs one
  copy of the frame, only for sizes that need it.
- The spacing between starts is at most ``floor((tile - overlap) / stride) * stride``, so neighbouring tiles
  always overlap by at least ``overlap`` pixels; ``overlap > tile - stride`` is refused (no aligned grid).

Input
- mono8 (H, W) or (H, W, 1); mono16 uint16 (shifted right by ``mono16_shift``, saturated to 255);
  RGB (H, W, 3) uint8 (or uint16, shifted). A mono model gets RGB converted to gray (cv2, BT.601); an RGB
  model gets mono replicated (a broadcast view: the copy happens once, when tiles are gathered).

Extraction
- NumPy: one block copy per tile into one contiguous B x H x W x C uint8 batch (a buffer the caller may
  reuse: ``out``).
- PyTorch (CUDA path): one index gather on the device (``extract_tiles_torch``); torch is imported lazily so
  the ONNX Runtime path never imports it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["TileGrid", "axis_starts", "tile_grid", "to_channels", "pad_to", "padded_size", "extract_tiles",
           "extract_tiles_torch", "align_roi", "inspect_mask"]


@dataclass(frozen=True)
class TileGrid:
    """Tile starts over a (padded) area; tiles in row-major order (all xs for ys[0], then ys[1], ...)."""

    height: int  # padded area covered by the grid
    width: int
    tile_h: int
    tile_w: int
    stride: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def starts(self) -> np.ndarray:
        """count x 2 array of (y, x) starts, row-major."""
        yy, xx = np.meshgrid(np.asarray(self.ys), np.asarray(self.xs), indexing="ij")
        return np.stack([yy.ravel(), xx.ravel()], axis=1)


def axis_starts(length: int, tile: int, overlap: int, stride: int = 1) -> tuple[int, ...]:
    """Tile starts along one axis: evenly spread multiples of ``stride``, last start = length - tile."""
    if tile < 1 or stride < 1 or tile % stride:
        raise ValueError(f"tile {tile} must be a positive multiple of the map stride {stride}")
    if length < tile or length % stride:
        raise ValueError(f"length {length} must be >= tile {tile} and a multiple of the stride {stride} "
                         "(pad the frame first)")
    if not 0 <= overlap <= tile - stride:
        raise ValueError(f"tile_overlap {overlap} must be in 0..{tile - stride} "
                         f"(tile {tile} - stride {stride})")
    if length == tile:
        return (0,)
    step_max = (tile - overlap) // stride  # in stride units
    span = (length - tile) // stride  # in stride units
    segments = -(-span // step_max)  # ceil
    return tuple(stride * ((i * span) // segments) for i in range(segments + 1))


def padded_size(size: int, tile: int, stride: int) -> int:
    """Smallest size >= ``size`` that is a multiple of ``stride`` and holds one tile."""
    return max(tile, -(-size // stride) * stride)


@functools.lru_cache(maxsize=256)
def tile_grid(height: int, width: int, tile_h: int, tile_w: int, overlap: int, stride: int = 1) -> TileGrid:
    """The grid covering a ``height`` x ``width`` area (already padded: see ``padded_size``). Cached."""
    ys = axis_starts(height, tile_h, overlap, stride)
    xs = axis_starts(width, tile_w, overlap, stride)
    return TileGrid(height, width, tile_h, tile_w, stride, ys, xs)


def to_channels(frame: np.ndarray, channels: int, mono16_shift: int = 8) -> np.ndarray:
    """Any accepted camera frame -> H x W x ``channels`` uint8 (a view when no conversion is needed)."""
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame must be a NumPy array, got {type(frame).__name__}")
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[2] not in (1, 3):
        raise ValueError(f"frame must be H x W (mono), H x W x 1 or H x W x 3 (RGB), got shape {frame.shape}")
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"frame is empty: shape {frame.shape}")
    if frame.dtype == np.uint16:
        frame = _mono16_to_8(frame, mono16_shift)
    elif frame.dtype != np.uint8:
        raise ValueError(f"frame dtype must be uint8 or uint16, got {frame.dtype}")
    if channels not in (1, 3):
        raise ValueError(f"model channels must be 1 or 3, got {channels}")
    if frame.shape[2] == channels:
        return frame
    if channels == 3:
        return np.broadcast_to(frame, frame.shape[:2] + (3,))
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)[:, :, None]


def _mono16_to_8(frame: np.ndarray, shift: int) -> np.ndarray:
    if not 0 <= shift <= 8:
        raise ValueError(f"mono16_shift must be in 0..8, got {shift}")
    shifted = frame >> np.uint16(shift)
    if shift < 8:
        np.minimum(shifted, 255, out=shifted)
    return shifted.astype(np.uint8)


def pad_to(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reflect-pad an H x W x C frame at the bottom/right to height x width (the frame itself when equal)."""
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    if h > height or w > width:
        raise ValueError(f"cannot pad {h}x{w} down to {height}x{width}")
    return np.pad(frame, ((0, height - h), (0, width - w), (0, 0)), mode="reflect")


def extract_tiles(frame: np.ndarray, grid: TileGrid, out: np.ndarray | None = None) -> np.ndarray:
    """Copy the grid's tiles of an H x W x C frame into one contiguous B x tile_h x tile_w x C array
    (``out`` when given: no allocation). One block copy per tile, row band by row band: cheaper than a
    fancy-index gather of a sliding-window view, which copies row by row through an index iterator."""
    if frame.shape[:2] != (grid.height, grid.width):
        raise ValueError(f"frame is {frame.shape[0]}x{frame.shape[1]}, "
                         f"grid expects {grid.height}x{grid.width}")
    shape = (grid.count, grid.tile_h, grid.tile_w, frame.shape[2])
    if out is None:
        out = np.empty(shape, dtype=frame.dtype)
    elif out.shape != shape or out.dtype != frame.dtype:
        raise ValueError(f"out must be {frame.dtype} {shape}, got {out.dtype} {out.shape}")
    th, tw, k = grid.tile_h, grid.tile_w, 0
    for y in grid.ys:
        band = frame[y:y + th]
        for x in grid.xs:
            out[k] = band[:, x:x + tw]
            k += 1
    return out


@functools.lru_cache(maxsize=64)
def _gather_index(grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(grid.ys)[:, None] + np.arange(grid.tile_h)[None, :]  # ny x th
    cols = np.asarray(grid.xs)[:, None] + np.arange(grid.tile_w)[None, :]  # nx x tw
    return rows, cols


def extract_tiles_torch(frame, grid: TileGrid):
    """Torch H x W x C tensor (any device) -> contiguous B x tile_h x tile_w x C tensor, one gather."""
    import torch

    if tuple(frame.shape[:2]) != (grid.height, grid.width):
        raise ValueError(f"frame is {frame.shape[0]}x{frame.shape[1]}, "
                         f"grid expects {grid.height}x{grid.width}")
    rows, cols = _gather_index(grid)
    rows_t = torch.as_tensor(rows, device=frame.device)[:, None, :, None]
    cols_t = torch.as_tensor(cols, device=frame.device)[None, :, None, :]
    tiles = frame[rows_t, cols_t]  # ny x nx x th x tw x C
    return tiles.reshape(grid.count, grid.tile_h, grid.tile_w, frame.shape[2])


def align_roi(roi: tuple[int, int, int, int] | None, height: int, width: int,
              stride: int) -> tuple[int, int, int, int]:
    """ROI (x, y, w, h) clipped to the frame, start moved down to a multiple of stride: (y0, y1, x0, x1)."""
    if roi is None:
        return 0, height, 0, width
    x, y, w, h = roi
    x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"roi {roi} does not intersect the {width}x{height} frame")
    return (y0 // stride) * stride, y1, (x0 // stride) * stride, x1


def _rect_cover(rect: tuple[int, int, int, int], map_h: int, map_w: int, stride: int) -> tuple[slice, slice]:
    """Map pixels that overlap a frame rectangle (x, y, w, h)."""
    x, y, w, h = rect
    return (slice(max(0, y // stride), max(0, min(map_h, -(-(y + h) // stride)))),
            slice(max(0, x // stride), max(0, min(map_w, -(-(x + w) // stride)))))


@functools.lru_cache(maxsize=64)
def inspect_mask(map_h: int, map_w: int, stride: int, roi: tuple[int, int, int, int] | None,
                 ignore_zones: tuple[tuple[int, int, int, int], ...]) -> np.ndarray | None:
    """Bool map-scale mask of inspected pixels (read-only, cached), or None when everything is inspected.

    A map pixel is inspected when it overlaps the ROI and overlaps no ignore zone (both conservative)."""
    if roi is None and not ignore_zones:
        return None
    mask = np.zeros((map_h, map_w), dtype=bool)
    if roi is None:
        mask[:] = True
    else:
        mask[_rect_cover(roi, map_h, map_w, stride)] = True
    for zone in ignore_zones:
        mask[_rect_cover(zone, map_h, map_w, stride)] = False
    mask.flags.writeable = False
    return mask
