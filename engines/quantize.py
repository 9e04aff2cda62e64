"""Static INT8 post-training quantisation of a bundle's model.onnx, calibrated on good tiles.

``quantize_bundle(bundle_dir, images)`` cuts calibration tiles from good (training) images, quantises the
core's convolutions and matrix products of model.onnx to QDQ INT8 and adds the result to the bundle as
model.int8.onnx, with its own sha256 and a ``quantization`` record in bundle.json (``files.onnx_int8``).

What is quantised: only Conv, ConvTranspose, MatMul and Gemm nodes (``op_types_to_quantize``), and never a
node of the deployable graph's ``/preprocess/`` or ``/postprocess/`` scopes (``nodes_to_exclude``): the uint8
input scaling, the map normalisation, the map combination and the resize stay FP32, as in every backend.
onnxruntime also quantises a Conv's output (so that it can fuse DQ -> Conv -> Q into QLinearConv), and every
reader of a quantised tensor reads the dequantised copy. ``strip_tail_qdq`` gives each reader that leads to
no quantised node (the core's FP32 tail: EfficientAD's squared student-teacher difference and channel mean,
DFR's reconstruction error against its features, then the post-processing) the FP32 tensor instead, and
drops pairs left without readers: the features that make the anomaly map are not rounded to 8 bits on their
way into it.
  weights      int8, symmetric, per output channel, 7 bit by default (``reduce_range``): the same file then
               runs on AVX2 CPUs without VNNI, whose u8 x s8 pair sums (vpmaddubsw) saturate with 8-bit
               weights
  activations  uint8, asymmetric, one scale per tensor, from the calibration tiles (MinMax by default;
               ``percentile`` or ``entropy`` on request). Tiles are random crops of good training images; a
               quarter of them (``anomaly_fraction``) get one synthetic anomaly, a square of uniform noise,
               flat black or flat white in turn (as in EfficientAD's and DRAEM's training), so that the
               ranges also cover abnormal responses. Measured on tests/test_precision_guard.py's tiny
               student-teacher: calibrated on good tiles alone, the strongest spot (8.57 in FP32) scored
               0.84 in INT8 (Spearman 0.989, AUROC -0.007, one verdict flip: the guard fails); with the
               squares 8.50 (Spearman 0.997, AUROC unchanged, no flip)
  kept FP32    by default (``keep_fp32``) also the ``input`` convolutions (reading the pre-processed tiles:
               3 input channels, little compute) and ``depthwise`` convolutions (EfficientNet-Lite0's; one
               activation scale per tensor hurts them most, and they are a small share of the compute). On
               a 10-step DFR (Lite0) on synthetic textures the largest image-score change fell from 0.15-0.17
               to 0.04 with both kept FP32; ``keep_fp32=()`` quantises them too.

Why onnxruntime.quantization and not NNCF: it comes with onnxruntime (the ``onnx`` extra; no new dependency
and nothing that could pull torch or CUDA builds), it writes standard QDQ ONNX, and that one file runs on
both CPU backends (ONNX Runtime fuses QDQ into QLinearConv; OpenVINO's low-precision transformations map it
to INT8 kernels). NNCF's extra algorithms (bias correction, accuracy-aware quantisation) are the next step
if real bundles miss the accuracy guard (benchmarks/precision_guard.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .base import BackendUnavailable
from .bundle import INT8_FILE, BundleError, BundleMeta, onnx_file, read_bundle, write_bundle_json

__all__ = ["QUANTIZED_OPS", "METHODS", "KEEP_FP32", "ANOMALY_FRACTION", "calibration_tiles", "excluded_nodes",
           "strip_tail_qdq", "quantize_onnx", "quantize_bundle"]

QUANTIZED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
METHODS = ("minmax", "percentile", "entropy")
FP32_SCOPES = ("/preprocess/", "/postprocess/")
KEEP_FP32 = ("input", "depthwise")  # sensitive layers left in FP32 by default
ANOMALY_FRACTION = 0.25  # calibration tiles that get a noise square


def calibration_tiles(images, tile_hw: tuple[int, int], channels: int, count: int = 64, seed: int = 0,
                      anomaly_fraction: float = ANOMALY_FRACTION) -> np.ndarray:
    """Pure: ``count`` seeded random tile crops (uint8 count x th x tw x C) spread over ``images`` in turn;
    the first ``anomaly_fraction`` of them get one square of uniform noise, flat black or flat white, in
    turn (see the module docstring)."""
    th, tw = tile_hw
    if not images:
        raise ValueError("no calibration images")
    if count < 1:
        raise ValueError(f"calibration tile count must be >= 1, got {count}")
    if not 0.0 <= anomaly_fraction <= 1.0:
        raise ValueError(f"anomaly_fraction must be within 0..1, got {anomaly_fraction}")
    rng = np.random.default_rng(seed)
    tiles = np.empty((count, th, tw, channels), dtype=np.uint8)
    for i in range(count):
        tiles[i] = _crop(images, i % len(images), (th, tw), channels, rng)
    for k, tile in enumerate(tiles[:int(round(count * anomaly_fraction))]):
        side = int(rng.integers(max(2, min(th, tw) // 16), max(3, min(th, tw) // 2)))
        y, x = int(rng.integers(0, th - side + 1)), int(rng.integers(0, tw - side + 1))
        if k % 2 == 0:  # uniform noise
            tile[y:y + side, x:x + side] = rng.integers(0, 256, (side, side, channels), dtype=np.uint8)
        else:  # flat black or white, in turn: the extremes a dark crack or a bright spot reaches
            tile[y:y + side, x:x + side] = 255 if k % 4 == 3 else 0
    return tiles


def _crop(images, index: int, tile_hw: tuple[int, int], channels: int, rng) -> np.ndarray:
    th, tw = tile_hw
    image = np.asarray(images[index])
    image = image[:, :, None] if image.ndim == 2 else image
    if image.dtype != np.uint8 or image.shape[2] != channels:
        raise ValueError(f"calibration image {index} is {image.dtype} with {image.shape[2]} channel(s); the "
                         f"bundle takes uint8 with {channels}")
    h, w = image.shape[:2]
    if h < th or w < tw:
        raise ValueError(f"calibration image {index} is {h} x {w}, smaller than the tile {th} x {tw}")
    y, x = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
    return image[y:y + th, x:x + tw]


def _is_depthwise(node) -> bool:
    return node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)


def excluded_nodes(onnx_path: str | Path, keep_fp32: tuple[str, ...] = KEEP_FP32) -> list[str]:
    """Nodes left in FP32: the pre/post-processing scopes, plus per ``keep_fp32`` the ``input`` convolutions
    (reading the pre-processed tiles) and the ``depthwise`` (grouped) convolutions."""
    import onnx

    unknown = set(keep_fp32) - set(KEEP_FP32)
    if unknown:
        raise ValueError(f"keep_fp32 takes {', '.join(KEEP_FP32)}, got {', '.join(sorted(unknown))}")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    scoped = [n.name for n in graph.node if any(scope in n.name for scope in FP32_SCOPES)]
    keep = _input_layers(graph) if "input" in keep_fp32 else []
    if "depthwise" in keep_fp32:
        keep += [n.name for n in graph.node if _is_depthwise(n)]
    return sorted(scoped) + sorted(set(keep))


def _input_layers(graph) -> list[str]:
    """The first quantisable nodes downstream of the pre-processing (through padding, reshapes, ...)."""
    consumers: dict = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    todo = [out for n in graph.node if "/preprocess/" in n.name for out in n.output]
    seen, first = set(), []
    while todo:
        for node in consumers.get(todo.pop(), []):
            if node.name in seen or "/preprocess/" in node.name:
                continue
            seen.add(node.name)
            if node.op_type in QUANTIZED_OPS:
                first.append(node.name)
            else:
                todo.extend(node.output)
    return first


def _reaches_quantised_op(node, consumers: dict) -> bool:
    """True when ``node`` is one of QUANTIZED_OPS or some node downstream of it is."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current.op_type in QUANTIZED_OPS:
            return True
        for out in current.output:
            for nxt in consumers.get(out, []):
                if id(nxt) not in seen:
                    seen.add(id(nxt))
                    todo.append(nxt)
    return False


def strip_tail_qdq(model) -> int:
    """Let every reader of a dequantised activation that reaches no quantised node read the FP32 tensor.

    A QuantizeLinear/DequantizeLinear pair left without readers is removed. Returns the readers rewired."""
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rewired = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight's DequantizeLinear
        for reader in consumers.get(dq.output[0], []):
            if not _reaches_quantised_op(reader, consumers):
                reader.input[:] = [q.input[0] if name == dq.output[0] else name for name in reader.input]
                rewired += 1
    _drop_unread(graph)
    return rewired


def _drop_unread(graph) -> None:
    """Remove Q/DQ nodes whose outputs nobody reads (repeatedly), then initializers nobody reads."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(out in read for out in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in read]:  # removed pairs' scales, zero points
        graph.initializer.remove(init)


def _quantization_api():
    try:
        from onnxruntime import quantization
    except ImportError as exc:
        raise BackendUnavailable(f"INT8 quantisation needs onnxruntime and onnx (pip install "
                                 f"edge-inspect[onnx]): {exc}") from exc
    return quantization


def _reader(q, input_name: str, tiles: np.ndarray, batch: int):
    class TileReader(q.CalibrationDataReader):
        """Feeds the calibration tiles in batches of ``batch``."""

        def __init__(self):
            self._batches = iter([tiles[i:i + batch] for i in range(0, len(tiles), batch)])

        def get_next(self):
            chunk = next(self._batches, None)
            return None if chunk is None else {input_name: np.ascontiguousarray(chunk)}

    return TileReader()


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _method(q, method: str):
    table = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
             "entropy": q.CalibrationMethod.Entropy}
    if method not in table:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    return table[method]


def quantize_onnx(src: str | Path, dst: str | Path, tiles: np.ndarray, *, method: str = "minmax",
                  reduce_range: bool = True, keep_fp32: tuple[str, ...] = KEEP_FP32, batch: int = 8,
                  input_name: str = "tiles") -> dict:
    """Quantise the FP32 graph ``src`` into the QDQ graph ``dst``; return the record kept in bundle.json."""
    q = _quantization_api()
    import onnx
    import onnxruntime

    excluded = excluded_nodes(src, keep_fp32)
    options = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if method == "percentile":
        options["CalibPercentile"] = 99.999
    with _quiet_root_logger():  # quantize_static warns on the root logger to run its pre-processing first
        q.quantize_static(str(src), str(dst), _reader(q, input_name, tiles, batch),
                          quant_format=q.QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                          per_channel=True, reduce_range=reduce_range, activation_type=q.QuantType.QUInt8,
                          weight_type=q.QuantType.QInt8, nodes_to_exclude=excluded,
                          calibrate_method=_method(q, method), extra_options=options)
    model = onnx.load(str(dst))
    stripped = strip_tail_qdq(model)
    onnx.save(model, str(dst))
    return {"format": "QDQ", "op_types": list(QUANTIZED_OPS), "fp32_scopes": list(FP32_SCOPES),
            "fp32_tail_readers": stripped, "fp32_layers": list(keep_fp32),
            "weights": f"int8 symmetric per-channel{' 7-bit (reduce_range)' if reduce_range else ''}",
            "activations": "uint8 asymmetric per-tensor",
            "calibration": {"method": method, "tiles": int(len(tiles))},
            "onnxruntime": onnxruntime.__version__}


def quantize_bundle(bundle_dir: str | Path, images, *, count: int = 64, seed: int = 0, method: str = "minmax",
                    reduce_range: bool = True, keep_fp32: tuple[str, ...] = KEEP_FP32,
                    anomaly_fraction: float = ANOMALY_FRACTION, source: str = "") -> BundleMeta:
    """Add model.int8.onnx to the bundle, calibrated on ``count`` tiles of good ``images``; return the meta.

    ``source`` says where the images came from (kept in bundle.json). An existing INT8 graph is replaced."""
    bundle_dir = Path(bundle_dir)
    meta = read_bundle(bundle_dir)
    spec = meta.input
    tiles = calibration_tiles(images, (spec.height, spec.width), spec.channels, count, seed, anomaly_fraction)
    partial = bundle_dir / (INT8_FILE + ".partial")
    try:
        record = quantize_onnx(onnx_file(bundle_dir, meta), partial, tiles, method=method,
                               reduce_range=reduce_range, keep_fp32=keep_fp32)
        os.replace(partial, bundle_dir / INT8_FILE)
    except Exception as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, (ValueError, BackendUnavailable)):
            raise
        raise BundleError(f"INT8 quantisation of {bundle_dir} failed: {exc}") from exc
    record["calibration"].update({"seed": seed, "source": source, "images": len(images),
                                  "anomaly_fraction": anomaly_fraction})
    files = {**meta.files, "onnx_int8": {"path": INT8_FILE, "sha256": "", "quantization": record}}
    write_bundle_json(bundle_dir, replace(meta, files=files))
    return read_bundle(bundle_dir)
