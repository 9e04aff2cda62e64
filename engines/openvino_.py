"""OpenVINO backend (CPU): runs model.onnx (fp32, bf16) or model.int8.onnx (int8) with OpenVINO Runtime.

Precision is always set, never left to the plugin: OpenVINO's CPU plugin runs BF16 by itself on CPUs with
AMX or AVX512-BF16 unless the inference precision hint says otherwise. So
  fp32  model.onnx, INFERENCE_PRECISION_HINT f32
  bf16  model.onnx, INFERENCE_PRECISION_HINT bf16; refused (BackendUnavailable) where the compiled model reads
        back anything but bf16 (OpenVINO quietly computes f32 on CPUs without native BF16)
  int8  model.int8.onnx (engines.quantize), INFERENCE_PRECISION_HINT f32 for the layers left in floating
        point; refused where no convolution of the compiled model runs in u8/i8
  auto  engines.cpuinfo.choose_precision (the CPU's ISA and what the bundle carries: int8 only once it
        passed the accuracy guard); one INFO line says why
and the engine reports what the compiled model runs in ``runtime`` (precision hint read back, streams,
threads, layers per runtime precision).

Threads and streams: ``threads`` sets INFERENCE_NUM_THREADS (default: all cores). The ``hint`` option picks
OpenVINO's PERFORMANCE_HINT: ``latency`` (default; one OpenVINO stream using every thread, best for batch 1)
or ``throughput`` (min(streams, threads) OpenVINO streams, batches of different slots run side by side).
Each slot owns one InferRequest on a single-worker executor (engines.base.SlotPool); ``infer`` uses its own
request under a lock. Results are copied out of the request into a new array for the caller.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from .base import (
    BackendUnavailable,
    BundleGeometry,
    EngineError,
    EngineInputError,
    SlotPool,
    batch_buckets,
    check_slot,
    check_tiles,
)
from .bundle import BundleMeta, carried_precisions, onnx_file, verified_precisions
from .cpuinfo import read_cpuinfo, resolve_precision

__all__ = ["OpenVinoEngine", "open_backend", "compile_config", "HINTS", "SUPPORTED"]

log = logging.getLogger(__name__)

SUPPORTED = ("fp32", "bf16", "int8")
HINTS = ("latency", "throughput")
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the hint covers non-quantised layers
_MATRIX_LAYERS = ("Convolution", "Deconvolution", "FullyConnected", "MatMul", "GroupConvolution")


def _ov():
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(f"openvino is not installed (pip install edge-inspect[onnx]): {exc}") \
            from exc
    return openvino


def compile_config(precision: str, hint: str, threads: int, streams: int, cache_dir: Path | None) -> dict:
    """Pure: the CPU plugin properties for ``precision`` (fp32/bf16/int8) and the performance ``hint``."""
    if hint not in HINTS:
        raise BackendUnavailable(f"openvino hint must be one of {', '.join(HINTS)}, got {hint!r}")
    ov_streams = 1 if hint == "latency" else max(1, min(streams, threads))
    config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision], "PERFORMANCE_HINT": hint.upper(),
              "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": ov_streams}
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir / "openvino")
    return config


def _type_name(value) -> str:
    """An ov.Type (or its string) as OpenVINO's short name: f32, bf16, u8, ..."""
    name = getattr(value, "to_string", None)
    return name() if callable(name) else str(value)


def runtime_layers(compiled) -> dict[str, int]:
    """Convolution/matmul layers of the compiled model per runtime precision, e.g. {"u8": 9, "f32": 1}."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if _any_value(info["layerType"]) in _MATRIX_LAYERS:
            precision = _any_value(info["runtimePrecision"]).lower()
            counts[precision] = counts.get(precision, 0) + 1
    return counts


def _any_value(value) -> str:
    """An rt_info entry (OVAny) as a string."""
    return str(getattr(value, "value", value))


def check_runtime(precision: str, hint_read_back: str, layers: dict[str, int], cpu: str) -> None:
    """Pure: BackendUnavailable unless the compiled model runs what ``precision`` promises."""
    if precision == "bf16" and hint_read_back != "bf16":
        raise BackendUnavailable(f"OpenVINO would run {hint_read_back}, not bf16, on this CPU ({cpu}): bf16 "
                                 "needs AMX-BF16 or AVX512-BF16")
    if precision in ("fp32", "int8") and hint_read_back != "f32":
        raise BackendUnavailable(f"OpenVINO would run {hint_read_back} when asked for f32 ({cpu})")
    if precision == "int8" and not (layers.get("u8", 0) + layers.get("i8", 0)):
        raise BackendUnavailable(f"no convolution of the INT8 graph runs in u8/i8 on this CPU ({cpu}); "
                                 f"layers by runtime precision: {layers}")


class OpenVinoEngine(BundleGeometry):
    backend = "openvino"
    device = "cpu"

    def __init__(self, model_path: Path, meta: BundleMeta, precision: str = "fp32", streams: int = 2,
                 max_batch: int = 16, threads: int | None = None, hint: str = "latency",
                 cache_dir: Path | None = None):
        ov = _ov()
        self.meta, self.streams, self.max_batch, self.precision = meta, streams, max_batch, precision
        self.threads = threads or os.cpu_count() or 1
        config = compile_config(precision, hint, self.threads, streams, cache_dir)
        try:
            core = ov.Core()
            compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
        except RuntimeError as exc:
            raise EngineError(f"openvino could not compile {model_path}: {exc}") from exc
        self.runtime = {"inference_precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
                        "num_streams": int(compiled.get_property("NUM_STREAMS")),
                        "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")), "hint": hint,
                        "layers": runtime_layers(compiled), "openvino": ov.get_version(),
                        "model": model_path.name}
        check_runtime(precision, self.runtime["inference_precision"], self.runtime["layers"],
                      read_cpuinfo().summary())
        self._requests = [compiled.create_infer_request() for _ in range(streams)]
        self._sync_request, self._sync_lock = compiled.create_infer_request(), threading.Lock()
        self._compiled = compiled
        self._slots = SlotPool(streams, "openvino")
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("engine is closed")

    def _check(self, tiles) -> None:
        self._check_open()
        if not isinstance(tiles, np.ndarray):
            raise EngineInputError(f"the openvino backend takes NumPy tiles, got {type(tiles).__name__}")
        check_tiles(tiles, self.input_shape, self.max_batch)

    @staticmethod
    def _run(request, tiles: np.ndarray) -> np.ndarray:
        request.start_async({0: np.ascontiguousarray(tiles)}, share_inputs=True)
        request.wait()
        return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)  # caller owns it

    def infer(self, tiles):
        self._check(tiles)
        with self._sync_lock:
            return self._run(self._sync_request, tiles)

    def submit(self, tiles, slot: int = 0) -> Future:
        self._check(tiles)
        check_slot(slot, self.streams)
        # copy: the caller may reuse its buffer as soon as submit returns (1 byte per pixel, cheap)
        return self._slots.submit(slot, self._run, self._requests[slot], np.array(tiles, copy=True))

    def warmup(self) -> None:
        self._check_open()
        for size in batch_buckets(self.max_batch):
            self.infer(np.zeros((size, *self.input_shape), dtype=np.uint8))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._slots.shutdown()
        self._requests, self._sync_request, self._compiled = [], None, None


def open_backend(bundle_dir: Path, meta: BundleMeta, *, device: str | None, precision: str | None,
                 streams: int, max_batch: int, threads: int | None, cache_dir: Path | None,
                 hint: str = "latency", **options) -> OpenVinoEngine:
    if options:
        raise BackendUnavailable(f"openvino backend has no options {sorted(options)} (it has: hint)")
    if device not in (None, "cpu"):
        raise BackendUnavailable(f"openvino backend runs on cpu only here, not {device!r}")
    chosen, why = resolve_precision(precision, carried_precisions(meta), SUPPORTED, "openvino",
                                    verified=verified_precisions(meta))
    if precision == "auto":
        log.info("openvino precision auto -> %s (%s)", chosen, why)
    path = onnx_file(bundle_dir, meta, "int8" if chosen == "int8" else "fp32")
    return OpenVinoEngine(path, meta, precision=chosen, streams=streams, max_batch=max_batch, threads=threads,
                          hint=hint, cache_dir=cache_dir)
