"""ONNX Runtime backend (CPU): runs model.onnx (fp32) or model.int8.onnx (int8), both with pre/post inside.

Precision: None or ``fp32`` runs model.onnx; ``int8`` runs the bundle's QDQ graph (engines.quantize; ORT fuses
it into QLinearConv kernels); ``auto`` picks int8 where the bundle carries a guard-checked one and the CPU has
INT8 dot products (engines.cpuinfo.choose_precision), with one INFO line saying why. bf16, fp16: refused.

One InferenceSession (graph optimisation ALL, sequential execution, intra-op threads = configured or the
machine's cores, inter-op 1). Each call binds the caller's tiles and a *new* output array with IO binding, so
ORT reads the tiles in place and writes the map straight into the array the caller receives (no extra copy).
``submit`` runs on one single-worker executor per slot; handles are concurrent.futures.Future.
"""

from __future__ import annotations

import logging
import os
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
    check_tiles,
)
from .bundle import BundleMeta, carried_precisions, onnx_file, verified_precisions
from .cpuinfo import resolve_precision

__all__ = ["OrtEngine", "open_backend", "session_options", "SUPPORTED"]

log = logging.getLogger(__name__)

SUPPORTED = ("fp32", "int8")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime is not installed: {exc}") from exc
    return onnxruntime


def session_options(threads: int | None):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    return opts


class OrtEngine(BundleGeometry):
    backend = "onnxruntime"
    device = "cpu"
    precision = "fp32"

    def __init__(self, onnx_path: Path, meta: BundleMeta, streams: int = 2, max_batch: int = 16,
                 threads: int | None = None, precision: str = "fp32"):
        ort = _ort()
        self.meta, self.streams, self.max_batch, self.precision = meta, streams, max_batch, precision
        self.threads = threads or os.cpu_count() or 1
        try:
            self._session = ort.InferenceSession(str(onnx_path), sess_options=session_options(threads),
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for invalid graphs
            raise EngineError(f"onnxruntime could not load {onnx_path}: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._slots = SlotPool(streams, "ort")
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("engine is closed")

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        ort = _ort()
        tiles = np.ascontiguousarray(tiles)
        out = np.empty((tiles.shape[0], 1, *self.map_shape), dtype=np.float32)  # new per call: caller owns it
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(self._input, ort.OrtValue.ortvalue_from_numpy(tiles))
        binding.bind_ortvalue_output(self._output, ort.OrtValue.ortvalue_from_numpy(out))
        self._session.run_with_iobinding(binding)
        return out

    def infer(self, tiles):
        self._check_open()
        if not isinstance(tiles, np.ndarray):
            raise EngineInputError(f"the onnxruntime backend takes NumPy tiles, got {type(tiles).__name__}")
        check_tiles(tiles, self.input_shape, self.max_batch)
        return self._run(tiles)

    def submit(self, tiles, slot: int = 0) -> Future:
        self._check_open()
        if not isinstance(tiles, np.ndarray):
            raise EngineInputError(f"the onnxruntime backend takes NumPy tiles, got {type(tiles).__name__}")
        check_tiles(tiles, self.input_shape, self.max_batch)
        # copy: the caller may reuse its buffer as soon as submit returns (1 byte per pixel, cheap)
        return self._slots.submit(slot, self._run, np.array(tiles, copy=True))

    def warmup(self) -> None:
        self._check_open()
        for size in batch_buckets(self.max_batch):
            self._run(np.zeros((size, *self.input_shape), dtype=np.uint8))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._slots.shutdown()
        self._session = None


def open_backend(bundle_dir: Path, meta: BundleMeta, *, device: str | None, precision: str | None,
                 streams: int, max_batch: int, threads: int | None, cache_dir: Path | None,
                 **options) -> OrtEngine:
    if options:
        raise BackendUnavailable(f"onnxruntime backend has no options {sorted(options)}")
    if device not in (None, "cpu"):
        raise BackendUnavailable(f"onnxruntime backend runs on cpu only here, not {device!r} "
                                 "(use backend='torch' or 'tensorrt' on a GPU)")
    chosen, why = resolve_precision(precision, carried_precisions(meta), SUPPORTED, "onnxruntime",
                                    verified=verified_precisions(meta))
    if precision == "auto":
        log.info("onnxruntime precision auto -> %s (%s)", chosen, why)
    return OrtEngine(onnx_file(bundle_dir, meta, chosen), meta, streams=streams, max_batch=max_batch,
                     threads=threads, precision=chosen)
