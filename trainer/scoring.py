"""Score images the way the daemon does: a trained model (``ModelEngine``) or an exported bundle behind the
engine interface, each image through ``inspection.pipeline.inspect_frame`` (tiling with overlap, blend
fusion, smoothing, image score). Calibration, evaluation and ``edge-train calibrate`` use it, so a threshold
means the same in the trainer and on the line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import numpy as np
import torch

from engines.bundle import MapSpec
from engines.graph import MapPostprocess, Preprocess
from inspection.pipeline import SCORING_KEYS, InspectConfig, inspect_frame
from inspection.verdict import smooth_map

__all__ = ["ModelEngine", "Scored", "score_images", "scoring_config", "config_for", "scoring_record",
           "DEFAULT_INSPECT"]

DEFAULT_INSPECT = InspectConfig()  # the daemon's defaults (tile overlap, blend fusion, max of smoothed map)


def scoring_config(tile: int, stride: int) -> InspectConfig:
    """The daemon's defaults with a tile overlap the tile can give: 32 px, at most a quarter of the tile
    (on the map stride). Recorded in bundle.json; the daemon uses the record as its defaults."""
    overlap = min(DEFAULT_INSPECT.tile_overlap, (tile // 4) // stride * stride)
    return replace(DEFAULT_INSPECT, tile_overlap=overlap)


def config_for(engine) -> InspectConfig:
    """The settings a bundle was calibrated with (bundle.json calibration.scoring), else scoring_config."""
    recorded = (getattr(engine.meta, "calibration", None) or {}).get("scoring")
    if recorded:
        return InspectConfig.from_mapping({k: v for k, v in recorded.items() if k in SCORING_KEYS}, "scoring")
    tile_h, tile_w = engine.input_shape[:2]
    return scoring_config(min(tile_h, tile_w), int(engine.meta.map.stride))


class ModelEngine:
    """A torch model as an Engine (engines/base.py contract, ``infer`` only): uint8 B x H x W x C tiles ->
    float32 B x 1 x h x w normalised maps (Preprocess -> model -> MapPostprocess, FP32, CPU)."""

    backend, device, precision, streams = "torch-model", "cpu", "fp32", 1

    def __init__(self, model, channels: int, tile_hw: tuple[int, int], map_spec: MapSpec, max_batch: int = 8):
        from engines.bundle import InputSpec

        stride = int(map_spec.stride)
        th, tw = int(tile_hw[0]), int(tile_hw[1])
        spec = InputSpec(height=th, width=tw, channels=channels, mean=tuple(model.input_mean),
                         std=tuple(model.input_std))
        grid = MapSpec(height=th // stride, width=tw // stride, stride=stride, q_a=map_spec.q_a,
                       q_b=map_spec.q_b, weights=map_spec.weights)
        self.model = model.eval()
        self.preprocess, self.postprocess = Preprocess(spec), MapPostprocess(grid)
        self.meta = SimpleNamespace(map=grid, input=spec, image_threshold=math.inf, pixel_threshold=math.inf)
        self.max_batch = int(max_batch)
        self.input_shape = (th, tw, channels)
        self.map_shape = (grid.height, grid.width)

    def infer(self, tiles: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = self.preprocess(torch.from_numpy(np.ascontiguousarray(tiles)))
            return self.postprocess(self.model(x)).float().numpy()

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray  # image score per image (the daemon's)
    maps: list[np.ndarray]  # smoothed frame maps at output scale (what regions are cut from)
    stride: int
    config: InspectConfig  # the settings they were scored with


def score_images(engine, images: list[np.ndarray], config: InspectConfig | None = None) -> Scored:
    """Each image through inspect_frame with ``config`` (default: config_for(engine)); scores only, the
    thresholds do not matter here."""
    config = config or config_for(engine)
    scores, maps = [], []
    for image in images:
        result = inspect_frame(engine, image, config)
        scores.append(result.score)
        maps.append(smooth_map(result.anomaly_map, config.smoothing_sigma))
    return Scored(np.asarray(scores, dtype=np.float64), maps, int(engine.meta.map.stride), config)


def scoring_record(config: InspectConfig) -> dict:
    """The inspection settings a threshold depends on (written to bundle.json's calibration record)."""
    return {k: v for k, v in asdict(config).items() if k in SCORING_KEYS}
