"""TensorRT backend (TensorRT 10/11 Python API); NOT RUN in this repository's CI (no GPU, no tensorrt).

The engine comes from engines.build (cache keyed by ONNX sha256, GPU, compute capability, TensorRT version,
precision, profiles; built on first open if missing). Precisions: ``fp16`` (default: FP16 graph with FP32
pre/post-processing and map head, engines.fp16), ``fp32`` (TF32 turned off in the builder, so FP32 layers
run IEEE FP32) and ``tf32`` (TensorRT's own default for FP32 layers, as an explicit choice).
Device memory and streams are PyTorch's (engines.cuda_slots): each slot owns a stream, an execution context
bound to its own optimisation profile, device input/output tensors whose data_ptr() are the tensor
addresses, and pinned host buffers. A batch is queued as host->device copy, set_input_shape +
execute_async_v3, device->host copy and an event; results are copied out of the slot's buffers before the
slot is reused. Everything runs with ``device`` current (multi-GPU). After ``close()`` every call raises
EngineError("engine is closed").
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

from .base import (
    BackendUnavailable,
    BundleGeometry,
    EngineError,
    EngineInputError,
    batch_buckets,
    check_slot,
    check_tiles,
)
from .build import PRECISIONS, build_engine, import_tensorrt
from .bundle import BundleMeta

__all__ = ["TensorRTEngine", "open_backend"]


def _bind_slot(slot, engine, index: int, names: tuple[str, str]):
    """Give ``slot`` an execution context on optimisation profile ``index``, bound to the slot's buffers."""
    slot.context = engine.create_execution_context()
    if slot.context is None:
        raise EngineError("TensorRT could not create an execution context (out of device memory?)")
    slot.context.set_optimization_profile_async(index, slot.stream.cuda_stream)
    slot.context.set_tensor_address(names[0], slot.dev_in.data_ptr())
    slot.context.set_tensor_address(names[1], slot.dev_out.data_ptr())
    return slot


class TensorRTEngine(BundleGeometry):
    backend = "tensorrt"

    def __init__(self, engine_path: Path, meta: BundleMeta, device: str = "cuda:0", precision: str = "fp16",
                 streams: int = 2, max_batch: int = 16, ops=None, trt=None):
        import torch

        from .cuda_slots import CUDA, Slot, ready_streams

        trt = trt or import_tensorrt()
        self._torch, self._ops = torch, ops or CUDA
        self.meta, self.device, self.precision = meta, device, precision
        self.streams, self.max_batch = streams, max_batch
        with self._ops.use_device(device):
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self._engine is None:
                raise EngineError(f"TensorRT could not deserialize {engine_path} "
                                  "(built for another GPU or TensorRT version?)")
            if self._engine.num_optimization_profiles < streams:
                raise EngineError(f"{engine_path} has {self._engine.num_optimization_profiles} optimisation "
                                  f"profiles, {streams} streams need one each: rebuild it")
            names = self._io_names(trt)
            out_shape = (1, *self.map_shape)
            self._slots = [_bind_slot(Slot(self._ops, device, self.input_shape, out_shape, max_batch,
                                           device_out=True), self._engine, i, names) for i in range(streams)]
            ready_streams(self._ops, self._slots, device)
        self._input_name = names[0]
        self._closed = False

    def _io_names(self, trt) -> tuple[str, str]:
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"expected one input and one output tensor, engine has {inputs} -> {outputs}")
        if self._engine.get_tensor_dtype(inputs[0]) != trt.DataType.UINT8:
            dtype = self._engine.get_tensor_dtype(inputs[0])
            raise EngineError(f"engine input {inputs[0]!r} is {dtype}, not uint8")
        if self._engine.get_tensor_dtype(outputs[0]) != trt.DataType.FLOAT:
            raise EngineError(f"engine output {outputs[0]!r} is not float32")
        return inputs[0], outputs[0]

    def _run_slot(self, slot, batch: int):
        if not slot.context.set_input_shape(self._input_name, (batch, *self.input_shape)):
            raise EngineError(f"TensorRT refused input shape {(batch, *self.input_shape)}")
        if not slot.context.execute_async_v3(slot.stream.cuda_stream):
            raise EngineError("TensorRT execute_async_v3 failed (see its log)")
        return slot.dev_out

    def _enqueue(self, slot, tiles, batch: int):
        from .cuda_slots import enqueue

        with self._ops.use_device(self.device):
            return enqueue(self._ops, slot, tiles, batch, self.device, lambda s: self._run_slot(s, batch))

    def _check(self, tiles) -> int:
        if self._closed:
            raise EngineError("engine is closed")
        if not isinstance(tiles, (np.ndarray, self._torch.Tensor)):
            raise EngineInputError(f"tiles must be a NumPy array or torch tensor, got {type(tiles).__name__}")
        return check_tiles(tiles, self.input_shape, self.max_batch)

    def infer(self, tiles):
        batch = self._check(tiles)  # before touching the slots: a closed engine has none
        return self._enqueue(self._slots[0], tiles, batch).result()

    def submit(self, tiles, slot: int = 0):
        batch = self._check(tiles)
        check_slot(slot, self.streams)
        return self._enqueue(self._slots[slot], tiles, batch)

    def warmup(self) -> None:
        if self._closed:
            raise EngineError("engine is closed")
        for size in batch_buckets(self.max_batch):
            tiles = np.zeros((size, *self.input_shape), dtype=np.uint8)
            for slot in self._slots:
                self._enqueue(slot, tiles, size).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        from .cuda_slots import finish_pending

        finish_pending(self._slots)
        self._ops.synchronize(self.device)
        self._slots = []  # contexts before the engine, buffers and last results with them
        self._engine = self._runtime = None
        gc.collect()
        self._ops.empty_cache()


def open_backend(bundle_dir: Path, meta: BundleMeta, *, device: str | None, precision: str | None,
                 streams: int, max_batch: int, threads: int | None, cache_dir: Path | None,
                 **options) -> TensorRTEngine:
    import_tensorrt()  # BackendUnavailable naming the reason when it is missing
    if options:
        raise BackendUnavailable(f"tensorrt backend has no options {sorted(options)}")
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable("tensorrt backend: its CUDA streams and memory are PyTorch's; install torch "
                                 f"({exc})") from exc
    device = device or "cuda:0"
    device = "cuda:0" if device == "cuda" else device
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise BackendUnavailable(f"tensorrt backend needs an NVIDIA GPU; device {device!r} is not one here")
    precision = precision or "fp16"
    if precision not in PRECISIONS:
        raise BackendUnavailable(f"tensorrt backend: precision {precision!r} not supported "
                                 f"({', '.join(PRECISIONS)})")
    engine_file = build_engine(bundle_dir, precision=precision, streams=streams, max_batch=max_batch,
                               cache_dir=cache_dir, device=device)
    return TensorRTEngine(engine_file, meta, device=device, precision=precision, streams=streams,
                          max_batch=max_batch)
