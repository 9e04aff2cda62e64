"""Export a trained model as a bundle (model.onnx, core.pt2, bundle.json) plus config.json, metrics.json."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from engines.bundle import BundleMeta, InputSpec, MapSpec
from engines.graph import export_bundle

from .calibrate import Thresholds

__all__ = ["export_model", "write_json", "rewrite_thresholds"]


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def export_model(model, out_dir: str | Path, *, tile: int, channels: int, map_spec: MapSpec,
                 thresholds: Thresholds, training_summary: dict | None = None, metrics: dict | None = None,
                 config: dict | None = None, calibration: dict | None = None,
                 int8_images: list | None = None) -> BundleMeta:
    """Write the bundle of ``model`` for uint8 tile x tile x channels input; return the verified meta.

    With ``int8_images`` (good training images) the bundle also gets model.int8.onnx (engines.quantize)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    stride = int(getattr(model, "map_stride", map_spec.stride))
    if tile % stride or (map_spec.height, map_spec.width) != (tile // stride, tile // stride):
        raise ValueError(f"map spec {map_spec.height}x{map_spec.width} does not match tile {tile} at "
                         f"stride {stride}")
    if len(map_spec.q_a) != int(model.num_maps):
        raise ValueError(f"map spec has {len(map_spec.q_a)} raw maps, the model {model.num_maps}")
    meta = BundleMeta(
        kind=model.kind, size=model.size,
        input=InputSpec(height=tile, width=tile, channels=channels, mean=tuple(map(float, model.input_mean)),
                        std=tuple(map(float, model.input_std))),
        map=map_spec, image_threshold=float(thresholds.image), pixel_threshold=float(thresholds.pixel),
        target_false_reject_rate=float(thresholds.target_frr),
        training=json.loads(json.dumps(training_summary or {}, default=_jsonable)),
        metrics=json.loads(json.dumps(metrics or {}, default=_jsonable)),
        calibration=json.loads(json.dumps(calibration or {}, default=_jsonable)),
        versions={"python": platform.python_version()},
    )
    final = export_bundle(model, meta, out_dir)
    write_json(Path(out_dir) / "config.json", config or {})
    write_json(Path(out_dir) / "metrics.json", metrics or {})
    if int8_images:
        from engines.quantize import quantize_bundle

        final = quantize_bundle(out_dir, int8_images, source="training images at export")
    return final


def rewrite_thresholds(bundle_dir: str | Path, calibration) -> BundleMeta:
    """Set a bundle's image/region thresholds and calibration record (trainer.calibrate.Calibration) in
    bundle.json; the model files are verified first and stay untouched. The previous thresholds are kept in
    calibration.previous."""
    from dataclasses import replace

    from engines.bundle import read_bundle, write_bundle_json

    meta = read_bundle(bundle_dir)
    record = {**calibration.to_dict(),
              "previous": {"image_threshold": meta.image_threshold, "pixel_threshold": meta.pixel_threshold,
                           "target_false_reject_rate": meta.target_false_reject_rate,
                           "source": meta.calibration.get("source")}}
    t = calibration.thresholds
    final = replace(meta, image_threshold=float(t.image), pixel_threshold=float(t.pixel),
                    target_false_reject_rate=float(t.target_frr),
                    calibration=json.loads(json.dumps(record, default=_jsonable)))
    write_bundle_json(bundle_dir, final)
    return read_bundle(bundle_dir)
