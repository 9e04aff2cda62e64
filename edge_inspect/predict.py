"""`edge-inspect predict`: inspect image files with a bundle, the way the daemon inspects camera frames.

Every image goes through ``inspection.pipeline.inspect_frame`` with an engine from
``engines.registry.open_engine``: the daemon's tiling, fusion and verdict code, with the same
``InspectConfig`` (defaults, or the ``inspection`` section and camera overrides of a daemon config).
Per image: one JSON line (verdict, score, threshold, regions in image pixels, the picture's path) in
``<out>/predictions.jsonl``, one row of the table on stdout, and ``<out>/<image name>.png``: the image with
the anomaly map overlaid, the regions outlined in red and a colour bar (0 to 2 x threshold, threshold
marked).

Images: a file, or every .png/.jpg/.jpeg/.bmp/.tif/.tiff file directly in a folder (sorted); 8-bit mono or
colour, or 16-bit mono (converted by the pipeline as camera frames are). An image that cannot be read or
inspected gets an ``error`` line and the others go on; the command then exits 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["Prediction", "list_inputs", "read_frame", "predict_images", "format_table", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Prediction:
    image: str
    verdict: str | None = None  # PASS | FAIL; None when the image failed
    score: float | None = None
    threshold: float | None = None
    reason: str = ""
    regions: tuple[dict, ...] = ()  # x, y, w, h, area (image pixels), peak, mean
    picture: str | None = None
    ms: float | None = None
    error: str = ""

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, "")})


def list_inputs(items: list[str | Path]) -> list[Path]:
    """The image files named, and those directly in the folders named; ValueError when none."""
    paths: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) directly in folder {item}")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise ValueError(f"{item} does not exist (give an image file or a folder of images)")
    return paths


def read_frame(path: Path) -> np.ndarray:
    """An image file as a camera frame: uint8 H x W (mono), H x W x 3 (RGB), or uint16 H x W (mono16)."""
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ValueError(f"cannot read image {path} (missing, corrupt or not an image)")
    if raw.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"image {path} has pixel type {raw.dtype}; expected 8 or 16 bit")
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[:, :, 0]
    if raw.ndim == 3:
        if raw.dtype != np.uint8:
            raw = (raw >> 8).astype(np.uint8)
        raw = cv2.cvtColor(raw[:, :, :3], cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(raw)


def _picture_path(out: Path, path: Path, used: set[str]) -> Path:
    name = f"{path.name}.png" if path.suffix.lower() != ".png" else path.name
    stem, k = name, 1
    while name in used:  # the same file name from two folders
        k += 1
        name = f"{Path(stem).stem}-{k}.png"
    used.add(name)
    return out / name


def _inspect_one(engine, path: Path, config, out: Path | None, used: set[str]) -> Prediction:
    import time

    from inspection.pipeline import inspect_frame

    from .overlay import encode_image, inspection_picture

    try:
        frame = read_frame(path)
        start = time.perf_counter()
        result = inspect_frame(engine, frame, config)
        ms = (time.perf_counter() - start) * 1e3
    except ValueError as exc:
        return Prediction(str(path), error=" ".join(str(exc).split()))
    regions = tuple(asdict(r) for r in result.regions)
    picture = None
    if out is not None:
        vmax = 2.0 * result.threshold if result.threshold > 0 else float(result.anomaly_map.max() or 1.0)
        rgb = inspection_picture(frame, result.anomaly_map, regions, vmax, result.threshold)
        picture = _picture_path(out, path, used)
        picture.write_bytes(encode_image(rgb, ".png"))
    return Prediction(str(path), result.verdict, float(result.score), float(result.threshold), result.reason,
                      regions, None if picture is None else str(picture), round(ms, 1))


def predict_images(bundle: str | Path, paths: list[Path], config, out: Path | None, backend: str = "auto",
                   threads: int | None = None, on_result=None) -> list[Prediction]:
    """Inspect every image; ``on_result(prediction)`` is called as each one is done."""
    from edge_daemon.worker import check_tiling
    from engines.bundle import read_bundle
    from engines.registry import open_engine

    check_tiling({None: config}, read_bundle(bundle))  # as the daemon does at start: one error, up front
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    engine = open_engine(bundle, backend=backend, max_batch=config.max_batch, threads=threads)
    results, used = [], set()
    try:
        for path in paths:
            result = _inspect_one(engine, path, config, out, used)
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        engine.close()
    if out is not None:
        (out / "predictions.jsonl").write_text("".join(p.to_json() + "\n" for p in results))
    return results


HEADER = f"{'image':<40} {'verdict':<7} {'score':>8} {'thr':>8} {'regions':>7} {'ms':>7}"


def format_row(p: Prediction) -> str:
    name = p.image if len(p.image) <= 40 else "..." + p.image[-37:]
    if p.error:
        return f"{name:<40} error: {p.error}"
    return (f"{name:<40} {p.verdict:<7} {p.score:8.4f} {p.threshold:8.4f} {len(p.regions):>7} "
            f"{p.ms if p.ms is not None else 0:7.0f}")


def format_table(predictions: list[Prediction]) -> str:
    return "\n".join([HEADER, *map(format_row, predictions)])


def say_row(prediction: Prediction, jsonl: bool) -> None:
    print(prediction.to_json() if jsonl else format_row(prediction), flush=True, file=sys.stdout)
