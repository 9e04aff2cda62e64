"""Run a model (or an exported bundle) on labelled images and compute the metrics.

Image scores and the maps the metrics read are the daemon's (trainer.scoring: inspection.pipeline tiles each
image at the bundle's tile size with the daemon's overlap, fuses, smooths and scores), so the false-reject and
miss rates measured here are the ones a line would see at the calibrated threshold.

Raw maps for the map normalisation (``raw_maps``): a fully convolutional model (DFR) runs on whole images; a
model built for a fixed input size (EfficientAD) covers each image with overlapping tiles whose origins lie on
the map stride, overlaps averaged (``tiled_maps``). Raw maps are normalised by
``engines.graph.MapPostprocess`` (the bundle's one formula) at the maps' own size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from engines.bundle import InputSpec, MapSpec
from engines.graph import MapPostprocess, Preprocess
from inspection.pipeline import InspectConfig

from .calibrate import Thresholds
from .data import GOOD, EvalSet
from .metrics import MetricError, au_pro, f1_max, image_auroc, pixel_auroc
from .scoring import ModelEngine, Scored, score_images

__all__ = ["EvalResult", "input_spec_for", "raw_maps", "normalise", "model_maps", "tile_starts", "tiled_maps",
           "model_scored", "bundle_scored", "fail_regions", "evaluate_scored"]


@dataclass(frozen=True)
class EvalResult:
    metrics: dict
    scores: np.ndarray  # image score per test image
    maps: list[np.ndarray]  # smoothed normalised frame map per test image (output scale)


def input_spec_for(model, channels: int, height: int, width: int) -> InputSpec:
    return InputSpec(height=height, width=width, channels=channels, mean=tuple(model.input_mean),
                     std=tuple(model.input_std))


def _batches(images: list[np.ndarray], batch_size: int):
    """Consecutive runs of same-shaped images, at most batch_size long: (start, stacked array)."""
    start = 0
    while start < len(images):
        end = start + 1
        while end < len(images) and end - start < batch_size and images[end].shape == images[start].shape:
            end += 1
        yield start, np.stack(images[start:end])
        start = end


def _model_tile(model) -> tuple[int, int] | None:
    """The fixed input size of a model that is not fully convolutional (EfficientAD), else None."""
    hw = getattr(model, "image_hw", None)
    return None if hw is None else (int(hw[0]), int(hw[1]))


def _run_model(model, batch: np.ndarray) -> np.ndarray:
    spec = input_spec_for(model, batch.shape[3], batch.shape[1], batch.shape[2])
    return model(Preprocess(spec)(torch.from_numpy(np.ascontiguousarray(batch)))).float().numpy()


def raw_maps(model, images: list[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
    """K x h x w float32 raw maps per uint8 H x W x C image: whole images for a fully convolutional
    model, overlapping tiles (``tiled_maps``) for a model built for a fixed input size."""
    model.eval()
    tile = _model_tile(model)
    with torch.no_grad():
        if tile is not None and any(im.shape[:2] != tile for im in images):
            return tiled_maps(lambda b: _run_model(model, b), images, tile, model.map_stride, batch_size)
        out: list[np.ndarray] = []
        for _, batch in _batches(images, batch_size):
            out.extend(_run_model(model, batch))
    return out


def normalise(raw: list[np.ndarray], map_spec: MapSpec) -> list[np.ndarray]:
    """Raw K x h x w maps -> normalised h x w maps with MapPostprocess at the raw maps' own size."""
    maps = []
    with torch.no_grad():
        for r in raw:
            post = MapPostprocess(replace(map_spec, height=r.shape[-2], width=r.shape[-1]))
            maps.append(post(torch.from_numpy(np.ascontiguousarray(r[None])))[0, 0].numpy())
    return maps


def model_maps(model, images: list[np.ndarray], map_spec: MapSpec, batch_size: int = 8) -> list[np.ndarray]:
    return normalise(raw_maps(model, images, batch_size), map_spec)


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, size): evenly spread, on multiples of ``stride``, first 0."""
    if size < tile:
        raise ValueError(f"image side {size} is smaller than the tile {tile}")
    count = -(-size // tile)  # enough tiles to cover the side
    last = (size - tile) // stride * stride
    return sorted({int(round(v / stride)) * stride for v in np.linspace(0, last, count)})


def tiled_maps(run, images: list[np.ndarray], tile: tuple[int, int], stride: int,
               batch_size: int = 8) -> list[np.ndarray]:
    """Maps of whole images from ``run(tiles B x th x tw x C) -> B x K x th/s x tw/s``, overlaps averaged."""
    th, tw = tile
    out = []
    for image in images:
        h, w = image.shape[:2]
        coords = [(y, x) for y in tile_starts(h, th, stride) for x in tile_starts(w, tw, stride)]
        acc, count = None, np.zeros((h // stride, w // stride), np.float64)
        for i in range(0, len(coords), batch_size):
            chunk = coords[i:i + batch_size]
            result = run(np.stack([image[y:y + th, x:x + tw] for y, x in chunk]))
            if acc is None:
                acc = np.zeros((result.shape[1], h // stride, w // stride), np.float64)
            for (y, x), m in zip(chunk, result, strict=True):
                ys = slice(y // stride, y // stride + m.shape[-2])
                xs = slice(x // stride, x // stride + m.shape[-1])
                acc[:, ys, xs] += m
                count[ys, xs] += 1
        out.append((acc / np.maximum(count, 1)).astype(np.float32))
    return out


def _upsample(maps: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    return np.stack([cv2.resize(m, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)
                     for m, mask in zip(maps, masks, strict=True)])


def model_scored(model, images: list[np.ndarray], channels: int, tile: int, map_spec: MapSpec,
                 config: InspectConfig | None = None, batch_size: int = 8) -> Scored:
    """Scores and smoothed frame maps of ``images`` from a torch model, as the daemon computes them."""
    engine = ModelEngine(model, channels, (tile, tile), map_spec, max_batch=batch_size)
    return score_images(engine, images, config)


def bundle_scored(bundle_dir: str | Path, images: list[np.ndarray], config: InspectConfig | None = None,
                  batch_size: int = 8, threads: int | None = None) -> Scored:
    """Scores and smoothed frame maps of ``images`` from a bundle's model.onnx (ONNX Runtime, CPU)."""
    from engines.registry import open_engine

    engine = open_engine(bundle_dir, backend="onnxruntime", max_batch=batch_size, streams=1, threads=threads)
    try:
        return score_images(engine, images, config)
    finally:
        engine.close()


def fail_regions(scored: Scored, thresholds: Thresholds) -> tuple[int, int]:
    """(FAIL verdicts, FAILs with at least one region) of every scored image, decided by the daemon's verdict
    code (inspection.verdict.decide) on its smoothed map at the calibrated thresholds."""
    from inspection.verdict import decide

    fails = with_regions = 0
    for score, smoothed in zip(scored.scores, scored.maps, strict=True):
        if score < thresholds.image:
            continue
        h, w = smoothed.shape
        frame_hw = (h * scored.stride, w * scored.stride)
        verdict = decide(smoothed, None, stride=scored.stride, frame_hw=frame_hw,
                         image_threshold=thresholds.image, pixel_threshold=thresholds.pixel, sigma=0.0,
                         min_area=scored.config.min_region_area)
        fails += 1
        with_regions += bool(verdict.regions)
    return fails, with_regions


def evaluate_scored(scored: Scored, data: EvalSet, thresholds: Thresholds | None = None) -> EvalResult:
    """Metrics from the daemon's scores and smoothed frame maps: image AUROC / F1-max on the headline
    images, per-group AUROC, rates at the calibrated threshold, pixel AUROC and AU-PRO (FPR <= 0.3) when
    masks exist."""
    scores, maps = scored.scores, scored.maps
    groups = np.array(data.groups)
    main = ~np.isin(groups, data.separate_groups)
    labels = data.labels[main]
    metrics: dict = {"n_good": int((labels == 0).sum()), "n_defect": int((labels == 1).sum())}
    metrics["image_auroc"] = image_auroc(scores[main], labels)
    metrics["image_f1_max"], metrics["image_f1_threshold"] = f1_max(scores[main], labels)
    if (labels == 0).sum() >= 2 and (labels == 1).any():
        # ranking at a fixed operating point, not deployable: the threshold is read off the test set itself
        at_2_percent = np.quantile(scores[main][labels == 0], 0.98)
        metrics["oracle_miss_at_frr_0.02"] = float((scores[main][labels == 1] < at_2_percent).mean())
    if thresholds is not None:
        rejected = scores[main] >= thresholds.image
        metrics["false_reject_rate"] = float(rejected[labels == 0].mean()) if (labels == 0).any() else None
        metrics["miss_rate"] = float((~rejected[labels == 1]).mean()) if (labels == 1).any() else None
        metrics["fails"], metrics["fails_with_regions"] = fail_regions(scored, thresholds)
    good = groups == GOOD
    metrics["per_group_auroc"] = {
        str(g): image_auroc(scores[good | (groups == g)], (groups[good | (groups == g)] == g).astype(int))
        for g in sorted(set(data.groups) - {GOOD})}
    if data.masks is not None:
        sel = np.flatnonzero(main)
        up = _upsample([maps[i] for i in sel], [data.masks[i] for i in sel])
        masks = np.stack([data.masks[i] for i in sel])
        try:
            metrics["pixel_auroc"] = pixel_auroc(up, masks)
            metrics["au_pro_0.3"] = au_pro(up, masks, 0.3)
        except MetricError as exc:
            metrics["pixel_metrics_skipped"] = str(exc)
    return EvalResult(metrics=metrics, scores=scores, maps=maps)
