"""TensorRT backend (TensorRT 10/11 Python API); NOT RUN in this repository's CI (no GPU, no tensorrt).

The engine comes from engines.build (cache keyed by ONNX sha256, GPU, compute capability, TensorRT version,
precision, profiles; built on first open if missing). Device memory and streams are PyTorch's: each slot owns
a torch.cuda.Stream, an execution context bound to its own optimisation profile, device input/output tensors
whose data_ptr() are the tensor addresses, and pinned host buffers. A batch is queued as host->device copy,
set_input_shape + execute_async_v3, device->host copy and an event; results are copied out of the slot's
buffers before the slot is reused.
"""

from __future__ import annotations

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
from .build import build_engine, import_tensorrt
from .bundle import BundleMeta

__all__ = ["TensorRTEngine", "open_backend"]


class _TrtSlot:
    def __init__(self, torch, engine, index: int, names: tuple[str, str], device: str, input_shape,
                 map_shape, max_batch: int):
        self.stream = torch.cuda.Stream(device=device)
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError("TensorRT could not create an execution context (out of device memory?)")
        self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
        self.host_in = torch.empty((max_batch, *input_shape), dtype=torch.uint8).pin_memory()
        self.host_out = torch.empty((max_batch, 1, *map_shape), dtype=torch.float32).pin_memory()
        self.dev_in = torch.zeros((max_batch, *input_shape), dtype=torch.uint8, device=device)
        self.dev_out = torch.empty((max_batch, 1, *map_shape), dtype=torch.float32, device=device)
        self.context.set_tensor_address(names[0], self.dev_in.data_ptr())
        self.context.set_tensor_address(names[1], self.dev_out.data_ptr())
        self.pending = None


class TensorRTEngine(BundleGeometry):
    backend = "tensorrt"

    def __init__(self, engine_path: Path, meta: BundleMeta, device: str = "cuda:0", precision: str = "fp16",
                 streams: int = 2, max_batch: int = 16):
        import torch

        trt = import_tensorrt()
        self._torch = torch
        self.meta, self.device, self.precision = meta, device, precision
        self.streams, self.max_batch = streams, max_batch
        torch.cuda.set_device(torch.device(device))
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self._engine is None:
            raise EngineError(f"TensorRT could not deserialize {engine_path} "
                              "(built for another GPU or TensorRT version?)")
        if self._engine.num_optimization_profiles < streams:
            raise EngineError(f"{engine_path} has {self._engine.num_optimization_profiles} optimisation "
                              f"profiles, {streams} streams need one each: rebuild it")
        names = self._io_names(trt)
        self._slots = [_TrtSlot(torch, self._engine, i, names, device, self.input_shape, self.map_shape,
                                max_batch) for i in range(streams)]
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

    def _enqueue(self, slot: _TrtSlot, tiles, batch: int):
        from .torch_ import _Handle, stage_input

        torch = self._torch
        as_torch = stage_input(slot, tiles, batch, self.device)
        with torch.cuda.stream(slot.stream):
            slot.dev_in[:batch].copy_(tiles if as_torch else slot.host_in[:batch], non_blocking=True)
            if not slot.context.set_input_shape(self._input_name, (batch, *self.input_shape)):
                raise EngineError(f"TensorRT refused input shape {(batch, *self.input_shape)}")
            if not slot.context.execute_async_v3(slot.stream.cuda_stream):
                raise EngineError("TensorRT execute_async_v3 failed (see its log)")
            device_out = slot.dev_out[:batch].clone() if as_torch else None
            if not as_torch:
                slot.host_out[:batch].copy_(slot.dev_out[:batch], non_blocking=True)
            event = torch.cuda.Event()
            event.record(slot.stream)
        slot.pending = _Handle(event, slot.host_out, device_out, batch)
        return slot.pending

    def _check(self, tiles) -> int:
        if self._closed:
            raise EngineError("engine is closed")
        if not isinstance(tiles, (np.ndarray, self._torch.Tensor)):
            raise EngineInputError(f"tiles must be a NumPy array or torch tensor, got {type(tiles).__name__}")
        return check_tiles(tiles, self.input_shape, self.max_batch)

    def infer(self, tiles):
        return self._enqueue(self._slots[0], tiles, self._check(tiles)).result()

    def submit(self, tiles, slot: int = 0):
        batch = self._check(tiles)
        check_slot(slot, self.streams)
        return self._enqueue(self._slots[slot], tiles, batch)

    def warmup(self) -> None:
        for size in batch_buckets(self.max_batch):
            tiles = np.zeros((size, *self.input_shape), dtype=np.uint8)
            for slot in self._slots:
                self._enqueue(slot, tiles, size).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            if slot.pending is not None:
                slot.pending.result()
        self._torch.cuda.synchronize(self.device)
        self._slots = []
        self._engine = self._runtime = None
        self._torch.cuda.empty_cache()


def open_backend(bundle_dir: Path, meta: BundleMeta, *, device: str | None, precision: str | None,
                 streams: int, max_batch: int, threads: int | None, cache_dir: Path | None,
                 **options) -> TensorRTEngine:
    import_tensorrt()  # BackendUnavailable naming the reason when it is missing
    if options:
        raise BackendUnavailable(f"tensorrt backend has no options {sorted(options)}")
    import torch

    device = device or "cuda:0"
    device = "cuda:0" if device == "cuda" else device
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise BackendUnavailable(f"tensorrt backend needs an NVIDIA GPU; device {device!r} is not one here")
    precision = precision or "fp16"
    if precision not in ("fp16", "fp32"):
        raise BackendUnavailable(f"tensorrt backend: precision {precision!r} not supported (fp16, fp32)")
    engine_file = build_engine(bundle_dir, precision=precision, streams=streams, max_batch=max_batch,
                               cache_dir=cache_dir, device=device)
    return TensorRTEngine(engine_file, meta, device=device, precision=precision, streams=streams,
                          max_batch=max_batch)
