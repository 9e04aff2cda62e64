"""PyTorch backend: core.pt2 (torch.export) between Preprocess and MapPostprocess built from bundle.json.

CPU: FP32 eager under torch.inference_mode; ``submit`` runs on one single-worker thread per slot.
CUDA: the core runs FP16 (or FP32) channels_last; Preprocess/MapPostprocess stay FP32. Each slot owns a CUDA
stream, pinned host input/output buffers and device buffers, and one CUDA graph per batch-size bucket
(1, 2, 4, ..., max_batch; a batch is padded up to its bucket). A batch's host->device copy, graph replay and
device->host copy are queued on its slot's stream and an event marks the end, so the copies of one slot
overlap the compute of another. Results are copied out of the slot's buffers before the slot is reused.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .base import (
    BackendUnavailable,
    BundleGeometry,
    EngineError,
    EngineInputError,
    SlotPool,
    batch_buckets,
    bucket_for,
    check_slot,
    check_tiles,
)
from .bundle import TORCH_FILE, BundleMeta

__all__ = ["TorchEngine", "open_backend", "load_core", "stage_input"]

try:
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency of this backend only
    torch = None


def load_core(path: Path, device: str = "cpu"):
    """torch.export program -> nn.Module on ``device`` (move_to_device_pass where this torch has it)."""
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise EngineError(f"could not load the torch.export core {path}: {exc}") from exc
    if device != "cpu":
        try:
            from torch.export.passes import move_to_device_pass
        except ImportError:
            return program.module().to(device)
        program = move_to_device_pass(program, device)
    return program.module()


class _Handle:
    """Result of one CUDA batch; copies out of the slot's pinned buffer at most once."""

    def __init__(self, event, host_out, device_out, batch: int):
        self._event, self._host_out, self._device_out, self._batch = event, host_out, device_out, batch
        self._value = None

    def done(self) -> bool:
        return self._value is not None or self._event.query()

    def result(self):
        if self._value is None:
            self._event.synchronize()
            if self._device_out is not None:  # torch in -> a fresh device tensor out
                self._value = self._device_out
                self._value.record_stream(torch.cuda.current_stream(self._value.device))
            else:
                self._value = self._host_out[: self._batch].numpy().copy()
            self._host_out = self._device_out = None
        return self._value


def stage_input(slot, tiles, batch: int, device) -> bool:
    """Free a slot for the next batch and stage its tiles; True when the tiles are a (device) torch tensor.

    Shared by the CUDA backends (torch, TensorRT): waits for the slot's previous batch to be copied out, then
    either orders the slot's stream after the caller's (torch tiles may still be being written) or copies
    NumPy tiles into the slot's pinned host buffer.
    """
    if slot.pending is not None:
        slot.pending.result()  # copy the previous batch out before its buffers are overwritten
    if isinstance(tiles, torch.Tensor):
        slot.stream.wait_stream(torch.cuda.current_stream(device))
        return True
    slot.host_in[:batch].numpy()[...] = tiles
    return False


class _CudaSlot:
    def __init__(self, device, input_shape, map_shape, max_batch: int):
        self.stream = torch.cuda.Stream(device=device)
        self.host_in = torch.empty((max_batch, *input_shape), dtype=torch.uint8).pin_memory()
        self.host_out = torch.empty((max_batch, 1, *map_shape), dtype=torch.float32).pin_memory()
        self.dev_in = torch.zeros((max_batch, *input_shape), dtype=torch.uint8, device=device)
        self.graphs: dict[int, tuple] = {}  # bucket -> (CUDAGraph, static output)
        self.pool = torch.cuda.graph_pool_handle()
        self.pending: _Handle | None = None


class TorchEngine(BundleGeometry):
    backend = "torch"

    def __init__(self, core_path: Path, meta: BundleMeta, device: str = "cpu", precision: str = "fp32",
                 streams: int = 2, max_batch: int = 16, threads: int | None = None, cuda_graphs: bool = True):
        from .graph import MapPostprocess, Preprocess

        self.meta, self.device, self.precision = meta, device, precision
        self.streams, self.max_batch, self.cuda_graphs = streams, max_batch, cuda_graphs
        self.buckets = batch_buckets(max_batch)
        if threads:
            torch.set_num_threads(threads)  # process-wide, as torch has it
        self._core_dtype = torch.float16 if precision == "fp16" else torch.float32
        core = load_core(core_path, device)  # exported in eval mode; .eval() is not allowed on it
        self._pre = Preprocess(meta.input).to(device).eval()
        self._post = MapPostprocess(meta.map).to(device).eval()
        if device == "cpu":
            self._core = core
            self._cpu_slots = SlotPool(streams, "torch")
        else:
            self._core = core.to(dtype=self._core_dtype, memory_format=torch.channels_last)
            self._slots = [_CudaSlot(device, self.input_shape, self.map_shape, max_batch)
                           for _ in range(streams)]
            self._capture_lock = threading.Lock()
        self._closed = False

    def _forward(self, tiles):
        x = self._pre(tiles)
        if self.device != "cpu":
            x = x.to(self._core_dtype).contiguous(memory_format=torch.channels_last)
        return self._post(self._core(x))

    def _check(self, tiles) -> int:
        if self._closed:
            raise EngineError("engine is closed")
        if not isinstance(tiles, (np.ndarray, torch.Tensor)):
            raise EngineInputError(f"tiles must be a NumPy array or torch tensor, got {type(tiles).__name__}")
        return check_tiles(tiles, self.input_shape, self.max_batch)

    # --- CPU --------------------------------------------------------------------------------------------
    def _run_cpu(self, tiles):
        as_numpy = isinstance(tiles, np.ndarray)
        with torch.inference_mode():
            out = self._forward(torch.from_numpy(tiles) if as_numpy else tiles)
        return out.numpy() if as_numpy else out  # a new tensor per call: nothing is reused

    # --- CUDA -------------------------------------------------------------------------------------------
    def _graph(self, slot: _CudaSlot, bucket: int):
        with self._capture_lock:
            if bucket not in slot.graphs:
                static_in = slot.dev_in[:bucket]
                with torch.inference_mode(), torch.cuda.stream(slot.stream):
                    for _ in range(2):  # warm up kernels / cuDNN choices outside the capture
                        self._forward(static_in)
                    slot.stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=slot.pool, stream=slot.stream,
                                          capture_error_mode="thread_local"):
                        static_out = self._forward(static_in)
                slot.graphs[bucket] = (graph, static_out)
            return slot.graphs[bucket]

    def _enqueue(self, slot: _CudaSlot, tiles, batch: int) -> _Handle:
        bucket = bucket_for(batch, self.buckets)
        as_torch = stage_input(slot, tiles, batch, self.device)
        graph = self._graph(slot, bucket) if self.cuda_graphs else None
        device_out = None
        with torch.inference_mode(), torch.cuda.stream(slot.stream):
            slot.dev_in[:batch].copy_(tiles if as_torch else slot.host_in[:batch], non_blocking=True)
            if graph is not None:
                graph[0].replay()
                out = graph[1]
            else:
                out = self._forward(slot.dev_in[:bucket])
            if as_torch:
                device_out = out[:batch].clone()
            else:
                slot.host_out[:batch].copy_(out[:batch], non_blocking=True)
            event = torch.cuda.Event()
            event.record(slot.stream)
        slot.pending = _Handle(event, slot.host_out, device_out, batch)
        return slot.pending

    # --- Engine protocol --------------------------------------------------------------------------------
    def infer(self, tiles):
        batch = self._check(tiles)
        if self.device == "cpu":
            return self._run_cpu(tiles)
        return self._enqueue(self._slots[0], tiles, batch).result()

    def submit(self, tiles, slot: int = 0):
        batch = self._check(tiles)
        check_slot(slot, self.streams)
        if self.device == "cpu":
            if isinstance(tiles, np.ndarray):
                tiles = np.array(tiles, copy=True)  # the caller may reuse its buffer once submit returns
            else:
                tiles = tiles.clone()
            return self._cpu_slots.submit(slot, self._run_cpu, tiles)
        return self._enqueue(self._slots[slot], tiles, batch)

    def warmup(self) -> None:
        if self._closed:
            raise EngineError("engine is closed")
        for size in self.buckets:
            tiles = np.zeros((size, *self.input_shape), dtype=np.uint8)
            if self.device == "cpu":
                self._run_cpu(tiles)
                continue
            for slot in self._slots:
                self._enqueue(slot, tiles, size).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.device == "cpu":
            self._cpu_slots.shutdown()
        else:
            for slot in self._slots:
                if slot.pending is not None:
                    slot.pending.result()
            torch.cuda.synchronize(self.device)
            self._slots = []
            torch.cuda.empty_cache()
        self._core = self._pre = self._post = None


def _resolve(device: str | None, precision: str | None) -> tuple[str, str]:
    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"torch backend: device {device!r} asked for but torch sees no CUDA "
                                     f"device (torch {torch.__version__})")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise BackendUnavailable(f"torch backend: {device!r} does not exist "
                                     f"({torch.cuda.device_count()} CUDA devices)")
        return device, precision or "fp16"
    if device != "cpu":
        raise BackendUnavailable(f"torch backend: unknown device {device!r} (cpu, cuda, cuda:N)")
    if precision not in (None, "fp32"):
        raise BackendUnavailable(f"torch backend: precision {precision!r} is not available on cpu "
                                 "(fp32 only)")
    return device, "fp32"


def open_backend(bundle_dir: Path, meta: BundleMeta, *, device: str | None, precision: str | None,
                 streams: int, max_batch: int, threads: int | None, cache_dir: Path | None,
                 cuda_graphs: bool = True, **options) -> TorchEngine:
    if torch is None:
        raise BackendUnavailable("torch backend: torch is not installed")
    if options:
        raise BackendUnavailable(f"torch backend has no options {sorted(options)}")
    if precision not in (None, "fp32", "fp16"):
        raise BackendUnavailable(f"torch backend: unknown precision {precision!r} (fp32, fp16)")
    device, precision = _resolve(device, precision)
    entry = meta.files.get("torch")
    if entry is None:
        raise BackendUnavailable(f"torch backend: bundle {bundle_dir} has no torch.export core "
                                 f"({TORCH_FILE})")
    return TorchEngine(bundle_dir / entry["path"], meta, device=device, precision=precision, streams=streams,
                       max_batch=max_batch, threads=threads, cuda_graphs=cuda_graphs)
