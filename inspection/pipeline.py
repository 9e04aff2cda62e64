"""One frame through tiling -> engine -> fusion -> verdict.

``inspect_frame(engine, frame, config)`` is the synchronous path; ``TileBatcher`` (batcher.py) runs the same
two halves, ``prepare_frame`` (validate, convert, tile: copies the frame's pixels into the tile batch, so no
reference to the caller's buffer is kept) and ``finish_frame`` (fuse, mask, verdict), around batched
engine calls shared by many frames.

Geometry: the ROI (or the whole frame) is the inspected area; its start is moved down to a multiple of the
map stride, the area is reflect-padded to a multiple of the stride and to at least one tile (tiling.py),
tiled, fused at output scale and placed into a frame map of ceil(H/stride) x ceil(W/stride) pixels. Pixels
outside the ROI or inside an ignore zone are not scored and read 0 in ``FrameResult.anomaly_map``.

Non-finite maps never PASS: decide() FAILs a frame with NaN/inf inspected pixels, and finish_frame FAILs one
whose engine maps hold NaN/inf anywhere else (padding, ignore zones), score +inf, the reason says so.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from .fusion import FUSION_MODES, FusionLayout, fuse, fuse_torch, fusion_layout
from .tiling import (
    TileGrid,
    align_roi,
    extract_tiles,
    extract_tiles_torch,
    inspect_mask,
    pad_to,
    padded_size,
    tile_grid,
    to_channels,
)
from .verdict import SCORE_MODES, Region, Verdict, decide

__all__ = ["SCORING_KEYS", "InspectConfig", "Region", "FrameResult", "ModelGeometry", "PreparedFrame",
           "TileBuffers", "TILE_BUFFERS", "model_geometry", "prepare_frame", "finish_frame", "infer_all",
           "inspect_frame"]

Rect = tuple[int, int, int, int]
# the settings an image threshold depends on: recorded in bundle.json at calibration, the daemon's defaults
SCORING_KEYS = ("tile_overlap", "fusion", "score", "topk", "smoothing_sigma")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(float(value))


def _int(path: str, value, low: int, high: int | None = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{path}: must be an int {bound}, got {value!r}")
    return int(value)


def _float(path: str, value, low: float, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not _is_number(value) or float(value) < low:
        kind = "a finite number" + (" or null" if optional else "")
        raise ValueError(f"{path}: must be {kind} >= {low}, got {value!r}")
    return float(value)


def _choice(path: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{path}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _rect(path: str, value) -> Rect:
    if (not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_is_int(v) for v in value)
            or value[0] < 0 or value[1] < 0 or value[2] < 1 or value[3] < 1):
        raise ValueError(f"{path}: must be [x, y, w, h] ints with x, y >= 0 and w, h >= 1, got {value!r}")
    return tuple(int(v) for v in value)


def _zones(path: str, value) -> tuple[Rect, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{path}: must be a list of [x, y, w, h], got {value!r}")
    return tuple(_rect(f"{path}[{i}]", zone) for i, zone in enumerate(value))


def _validated(values: dict[str, Any], path: str) -> dict[str, Any]:
    v = dict(values)
    v["tile_overlap"] = _int(f"{path}.tile_overlap", v["tile_overlap"], 0)
    v["fusion"] = _choice(f"{path}.fusion", v["fusion"], FUSION_MODES)
    v["score"] = _choice(f"{path}.score", v["score"], SCORE_MODES)
    v["topk"] = _int(f"{path}.topk", v["topk"], 1)
    v["smoothing_sigma"] = _float(f"{path}.smoothing_sigma", v["smoothing_sigma"], 0.0)
    v["image_threshold"] = _float(f"{path}.image_threshold", v["image_threshold"], -math.inf, optional=True)
    v["pixel_threshold"] = _float(f"{path}.pixel_threshold", v["pixel_threshold"], -math.inf, optional=True)
    v["min_region_area"] = _int(f"{path}.min_region_area", v["min_region_area"], 0)
    v["max_regions"] = _int(f"{path}.max_regions", v["max_regions"], 0)
    v["roi"] = None if v["roi"] is None else _rect(f"{path}.roi", v["roi"])
    v["ignore_zones"] = _zones(f"{path}.ignore_zones", v["ignore_zones"])
    v["mono16_shift"] = _int(f"{path}.mono16_shift", v["mono16_shift"], 0, 8)
    v["max_batch"] = _int(f"{path}.max_batch", v["max_batch"], 1)
    v["max_delay_us"] = _int(f"{path}.max_delay_us", v["max_delay_us"], 0)
    return v


@dataclass(frozen=True)
class InspectConfig:
    """Per-camera inspection settings; validated on construction (per-camera copies: dataclasses.replace)."""

    tile_overlap: int = 32  # minimum overlap between neighbouring tiles, frame pixels
    fusion: str = "blend"  # "blend" | "max"
    score: str = "max"  # image score: "max" of the smoothed map | "topk" mean
    topk: int = 100
    smoothing_sigma: float = 1.0  # map pixels; 0 = no smoothing
    image_threshold: float | None = None  # None -> the bundle's
    pixel_threshold: float | None = None  # None -> the bundle's
    min_region_area: int = 16  # frame pixels
    max_regions: int = 64  # regions listed per frame (largest peaks first)
    roi: Rect | None = None  # x, y, w, h inspected; outside ignored
    ignore_zones: tuple[Rect, ...] = ()
    mono16_shift: int = 8  # uint16 -> uint8 by >> shift, saturated at 255
    max_batch: int = 16
    max_delay_us: int = 2000

    def __post_init__(self):
        values = _validated({f.name: getattr(self, f.name) for f in fields(self)}, "InspectConfig")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, mapping: dict, path: str = "inspection") -> InspectConfig:
        """Build from a parsed YAML/JSON mapping; errors name the key: ``inspection.topk: must be ...``."""
        if not isinstance(mapping, dict):
            raise ValueError(f"{path}: must be a mapping, got {type(mapping).__name__}")
        known = {f.name for f in fields(cls)}
        for key in mapping:
            if key not in known:
                raise ValueError(f"{path}.{key}: unknown key (known: {', '.join(sorted(known))})")
        defaults = {f.name: f.default for f in fields(cls)}
        return cls(**_validated({**defaults, **mapping}, path))


@dataclass
class FrameResult:
    verdict: str  # "PASS" | "FAIL"
    reason: str
    score: float
    threshold: float
    regions: list[Region]
    anomaly_map: np.ndarray  # fused frame map at output scale, float32, ceil(H/stride) x ceil(W/stride)
    timings_ms: dict[str, float]  # tile, infer, fuse, verdict


@dataclass(frozen=True)
class ModelGeometry:
    tile_h: int
    tile_w: int
    channels: int
    map_h: int
    map_w: int
    stride: int
    image_threshold: float
    pixel_threshold: float


def model_geometry(engine) -> ModelGeometry:
    """What tiling and fusion need from an engine; checks the map grid matches tile / stride."""
    tile_h, tile_w, channels = engine.input_shape
    map_h, map_w = engine.map_shape
    stride = int(engine.meta.map.stride)
    if map_h * stride != tile_h or map_w * stride != tile_w:
        raise ValueError(f"engine maps {map_h}x{map_w} at stride {stride} do not cover its "
                         f"{tile_h}x{tile_w} tiles: tiles must be map size x stride")
    return ModelGeometry(tile_h, tile_w, channels, map_h, map_w, stride, float(engine.meta.image_threshold),
                         float(engine.meta.pixel_threshold))


class TileBuffers:
    """Tile batches to reuse, per shape: ``prepare_frame`` copies a frame's tiles into a buffer taken here
    and ``finish_frame`` gives it back once every tile map has come back (engines copy their input on
    ``submit``, and no batch of the frame is in flight by then). At most ``keep`` idle buffers per shape
    and ``max_bytes`` idle in all; a frame that fails never gives its buffer back (it is freed)."""

    def __init__(self, keep: int = 4, max_bytes: int = 256 << 20):
        self.keep, self.max_bytes = keep, max_bytes
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key)
            if free:
                buf = free.pop()
                self._bytes -= buf.nbytes
                return buf
        return np.empty(shape, dtype=dtype)

    def give(self, buf: np.ndarray) -> None:
        key = (buf.shape, buf.dtype.str)
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < self.keep and self._bytes + buf.nbytes <= self.max_bytes:
                free.append(buf)
                self._bytes += buf.nbytes

    @property
    def idle_bytes(self) -> int:
        return self._bytes


TILE_BUFFERS = TileBuffers()  # the process's tile batches (NumPy path)


@dataclass
class PreparedFrame:
    """A frame's tiles and everything needed to turn their maps into a FrameResult."""

    tiles: Any  # B x H x W x C uint8 (NumPy, or torch on the device path)
    grid: TileGrid
    layout: FusionLayout
    frame_hw: tuple[int, int]
    offset: tuple[int, int]  # ROI start in map pixels
    area_map_hw: tuple[int, int]  # ROI size in map pixels (crop of the fused padded area)
    mask: np.ndarray | None
    tile_ms: float
    pooled: bool = False  # tiles taken from TILE_BUFFERS: given back by finish_frame


def _plan(frame: np.ndarray, geom: ModelGeometry, config: InspectConfig):
    image = to_channels(frame, geom.channels, config.mono16_shift)
    height, width = image.shape[:2]
    s = geom.stride
    y0, y1, x0, x1 = align_roi(config.roi, height, width, s)
    area = pad_to(image[y0:y1, x0:x1], padded_size(y1 - y0, geom.tile_h, s),
                  padded_size(x1 - x0, geom.tile_w, s))
    grid = tile_grid(area.shape[0], area.shape[1], geom.tile_h, geom.tile_w, config.tile_overlap, s)
    layout = fusion_layout(grid, geom.map_h, geom.map_w)
    map_hw = (-(-height // s), -(-width // s))
    mask = inspect_mask(*map_hw, s, config.roi, config.ignore_zones)
    area_map_hw = (-(-(y1 - y0) // s), -(-(x1 - x0) // s))
    return area, grid, layout, (height, width), (y0 // s, x0 // s), area_map_hw, mask


def prepare_frame(frame: np.ndarray, geom: ModelGeometry, config: InspectConfig, device: str | None = None
                  ) -> PreparedFrame:
    """Validate, convert and tile a frame (ValueError with the reason on a bad frame). The tiles are a copy.

    ``device`` (e.g. "cuda:0") gathers the tiles on that torch device instead of in NumPy."""
    start = time.perf_counter()
    area, grid, layout, frame_hw, offset, area_map_hw, mask = _plan(frame, geom, config)
    if device is None:
        shape = (grid.count, grid.tile_h, grid.tile_w, area.shape[2])
        tiles = extract_tiles(area, grid, out=TILE_BUFFERS.take(shape, area.dtype))
    else:
        import torch

        tiles = extract_tiles_torch(torch.from_numpy(np.ascontiguousarray(area)).to(device), grid)
    return PreparedFrame(tiles, grid, layout, frame_hw, offset, area_map_hw, mask,
                         (time.perf_counter() - start) * 1e3, pooled=device is None)


def finish_frame(prepared: PreparedFrame, maps, geom: ModelGeometry, config: InspectConfig,
                 infer_ms: float) -> FrameResult:
    """Fuse the tile maps (NumPy, or torch on the device path), place them in the frame map, decide.

    ``maps`` are consumed (weighted in place by the fusion); the tiles go back to TILE_BUFFERS."""
    start = time.perf_counter()
    if prepared.pooled:
        TILE_BUFFERS.give(prepared.tiles)
        prepared.tiles, prepared.pooled = None, False
    if isinstance(maps, np.ndarray):
        fused = fuse(maps, prepared.layout, config.fusion, consume=True)
    else:
        fused = fuse_torch(maps, prepared.layout, config.fusion).cpu().numpy()
    map_h, map_w = -(-prepared.frame_hw[0] // geom.stride), -(-prepared.frame_hw[1] // geom.stride)
    (oy, ox), (ah, aw) = prepared.offset, prepared.area_map_hw
    if (oy, ox, ah, aw) == (0, 0, map_h, map_w) and fused.shape == (map_h, map_w):
        frame_map = fused
    else:
        frame_map = np.zeros((map_h, map_w), dtype=np.float32)
        frame_map[oy:oy + ah, ox:ox + aw] = fused[:ah, :aw]
    mid = time.perf_counter()
    verdict = decide(frame_map, prepared.mask, stride=geom.stride, frame_hw=prepared.frame_hw,
                     image_threshold=_pick(config.image_threshold, geom.image_threshold),
                     pixel_threshold=_pick(config.pixel_threshold, geom.pixel_threshold),
                     score_mode=config.score, topk=config.topk, sigma=config.smoothing_sigma,
                     min_area=config.min_region_area, max_regions=config.max_regions)
    verdict = _guard_nonfinite(verdict, maps, prepared.frame_hw)
    if prepared.mask is not None:
        frame_map[~prepared.mask] = 0.0
    end = time.perf_counter()
    timings = {"tile": prepared.tile_ms, "infer": infer_ms, "fuse": (mid - start) * 1e3,
               "verdict": (end - mid) * 1e3}
    return FrameResult(verdict.verdict, verdict.reason, verdict.score, verdict.threshold, verdict.regions,
                       frame_map, timings)


def _nonfinite_count(maps) -> int:
    """NaN/inf values among an engine's tile maps (NumPy or torch)."""
    if isinstance(maps, np.ndarray):
        return 0 if np.isfinite(maps).all() else int(np.count_nonzero(~np.isfinite(maps)))
    import torch

    return int(torch.count_nonzero(~torch.isfinite(maps)).item())


def _guard_nonfinite(verdict: Verdict, maps, frame_hw: tuple[int, int]) -> Verdict:
    """A frame whose engine maps hold NaN/inf never PASSes, even where decide() did not see them (padding,
    ignore zones, a fusion that dropped them): FAIL, score +inf, the count in the reason. The values lie
    outside the inspected pixels, so the one region reported is the whole frame (every FAIL says where)."""
    if verdict.verdict != "PASS":
        return verdict
    bad = _nonfinite_count(maps)
    if not bad:
        return verdict
    reason = (f"engine returned {bad} non-finite map values (NaN/inf, numeric overflow?) outside the "
              f"inspected pixels, FAIL by rule; region: the whole frame; was: {verdict.reason}")
    height, width = frame_hw
    whole = Region(x=0, y=0, w=width, h=height, area=width * height, peak=math.inf, mean=math.inf)
    return replace(verdict, verdict="FAIL", reason=reason, score=math.inf, regions=[whole])


def _pick(override: float | None, default: float) -> float:
    return default if override is None else override


def _device_of(engine) -> str | None:
    device = str(getattr(engine, "device", "cpu"))
    return device if device.startswith("cuda") else None


def infer_all(engine, tiles):
    """Run every tile through ``engine.infer`` in chunks of engine.max_batch; one B x 1 x h x w result."""
    step = int(engine.max_batch)
    parts = [engine.infer(tiles[i:i + step]) for i in range(0, len(tiles), step)]
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)


def inspect_frame(engine, frame: np.ndarray, config: InspectConfig) -> FrameResult:
    """Inspect one frame synchronously. On a CUDA engine tiles are gathered and fused on the device."""
    geom = model_geometry(engine)
    prepared = prepare_frame(frame, geom, config, device=_device_of(engine))
    start = time.perf_counter()
    maps = infer_all(engine, prepared.tiles)
    infer_ms = (time.perf_counter() - start) * 1e3
    return finish_frame(prepared, maps, geom, config, infer_ms)
