"""PyTorch backend: core.pt2 (torch.export) between Preprocess and MapPostprocess built from bundle.json.

CPU: FP32 eager under torch.inference_mode; ``submit`` runs on one single-worker thread per slot.
CUDA (precisions: ``fp16`` default, ``fp32`` = IEEE FP32, ``tf32`` = FP32 tensors with TF32 convolutions and
matmuls, PyTorch's own default for cuDNN convolutions, named here so it is a choice, never a silent one):
- fp16: engines.torch_fp16 rewrites the core: convolutions and everything above the last of them FP16,
  the map head (squared differences, channel sums/means, EfficientAD's teacher normalisation) FP32, so an
  out-of-distribution tile cannot overflow FP16 into an inf/NaN map; Preprocess/MapPostprocess stay FP32;
- fp32/tf32: the core in FP32, each forward and CUDA-graph capture inside ``fp32_math(precision)``;
- channels_last; each slot owns a CUDA stream, pinned host in/out buffers, a device input buffer and one
  CUDA graph per batch-size bucket (1, 2, 4, ..., max_batch; a batch is padded up to its bucket). Batches
  run through engines.cuda_slots.enqueue (stream rules there: slot streams wait for the engine's set-up,
  torch tiles are record_stream-ed and held until the batch's event);
- ``close()`` waits for the slots, then drops them (graphs, pools, buffers, the last results), the core and
  pre/post modules, and only then empties the caching allocator.
"""

from __future__ import annotations

import gc
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

__all__ = ["TorchEngine", "open_backend", "load_core", "PRECISIONS"]

PRECISIONS = ("fp32", "tf32", "fp16")

try:
    import torch
except ImportError:  # pragma: no cover - torch is a hard dependency of this backend only
    torch = None


def load_core(path: Path, device="cpu"):
    """torch.export program -> nn.Module on ``device`` (move_to_device_pass where this torch has it)."""
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise EngineError(f"could not load the torch.export core {path}: {exc}") from exc
    if str(device) != "cpu":
        try:
            from torch.export.passes import move_to_device_pass
        except ImportError:
            return program.module().to(device)
        program = move_to_device_pass(program, device)
    return program.module()


class TorchEngine(BundleGeometry):
    backend = "torch"

    def __init__(self, core_path: Path, meta: BundleMeta, device: str = "cpu", precision: str = "fp32",
                 streams: int = 2, max_batch: int = 16, threads: int | None = None, cuda_graphs: bool = True,
                 ops=None):
        from .graph import MapPostprocess, Preprocess

        self.meta, self.device, self.precision = meta, device, precision
        self.streams, self.max_batch, self.cuda_graphs = streams, max_batch, cuda_graphs
        self.buckets = batch_buckets(max_batch)
        if threads:
            torch.set_num_threads(threads)  # process-wide, as torch has it
        self._closed = False
        if device == "cpu":
            self._core = load_core(core_path)  # exported in eval mode; .eval() is not allowed on it
            self._pre, self._post = Preprocess(meta.input).eval(), MapPostprocess(meta.map).eval()
            self._cpu_slots = SlotPool(streams, "torch")
            return
        from .cuda_slots import CUDA, Slot, ready_streams

        self._ops = ops or CUDA
        where = self._ops.tensor_device(device)
        with self._ops.use_device(device):  # streams, buffers and kernels on this GPU, not the current one
            self._core = self._cuda_core(core_path, where)
            self._pre = Preprocess(meta.input).to(where).eval()
            self._post = MapPostprocess(meta.map).to(where).eval()
            self._slots = [Slot(self._ops, device, self.input_shape, (1, *self.map_shape), max_batch)
                           for _ in range(streams)]
            for slot in self._slots:
                slot.graphs, slot.pool = {}, None  # bucket -> (CUDAGraph, static output); graph pool
            ready_streams(self._ops, self._slots, device)
        self._capture_lock = threading.Lock()

    def _cuda_core(self, core_path: Path, where):
        core = load_core(core_path, where)
        if self.precision == "fp16":
            from .torch_fp16 import mixed_precision

            core = mixed_precision(core)
        return core.to(memory_format=torch.channels_last)

    def _forward(self, tiles):
        if self.device == "cpu":
            return self._post(self._core(self._pre(tiles)))
        from .cuda_slots import fp32_math

        with fp32_math(self.precision):
            x = self._pre(tiles).contiguous(memory_format=torch.channels_last)
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
    def _graph(self, slot, bucket: int):
        with self._capture_lock:
            if bucket not in slot.graphs:
                static_in = slot.dev_in[:bucket]
                with torch.inference_mode(), torch.cuda.stream(slot.stream):
                    for _ in range(2):  # warm up kernels / cuDNN choices outside the capture
                        self._forward(static_in)
                    slot.stream.synchronize()
                    slot.pool = slot.pool or torch.cuda.graph_pool_handle()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=slot.pool, stream=slot.stream,
                                          capture_error_mode="thread_local"):
                        static_out = self._forward(static_in)
                slot.graphs[bucket] = (graph, static_out)
            return slot.graphs[bucket]

    def _run_slot(self, slot, batch: int):
        bucket = bucket_for(batch, self.buckets)
        if not self.cuda_graphs:
            return self._forward(slot.dev_in[:bucket])
        graph, static_out = self._graph(slot, bucket)
        graph.replay()
        return static_out

    def _enqueue(self, slot, tiles, batch: int):
        from .cuda_slots import enqueue

        with self._ops.use_device(self.device):
            return enqueue(self._ops, slot, tiles, batch, self.device, lambda s: self._run_slot(s, batch))

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
            self._core = self._pre = self._post = None
            return
        from .cuda_slots import finish_pending

        finish_pending(self._slots)
        self._ops.synchronize(self.device)
        self._slots = []  # graphs, graph pools, buffers and the last results go with the slots
        self._core = self._pre = self._post = None
        gc.collect()  # an fx.GraphModule is in a reference cycle (graph.owning_module): refcounts miss it
        self._ops.empty_cache()  # only now is the memory unreferenced


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
                                 "(fp32 only; tf32 and fp16 need CUDA)")
    return device, "fp32"


def open_backend(bundle_dir: Path, meta: BundleMeta, *, device: str | None, precision: str | None,
                 streams: int, max_batch: int, threads: int | None, cache_dir: Path | None,
                 cuda_graphs: bool = True, **options) -> TorchEngine:
    if torch is None:
        raise BackendUnavailable("torch backend: torch is not installed")
    if options:
        raise BackendUnavailable(f"torch backend has no options {sorted(options)}")
    if precision not in (None, *PRECISIONS):
        raise BackendUnavailable(f"torch backend: unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    device, precision = _resolve(device, precision)
    entry = meta.files.get("torch")
    if entry is None:
        raise BackendUnavailable(f"torch backend: bundle {bundle_dir} has no torch.export core "
                                 f"({TORCH_FILE})")
    return TorchEngine(bundle_dir / entry["path"], meta, device=device, precision=precision, streams=streams,
                       max_batch=max_batch, threads=threads, cuda_graphs=cuda_graphs)
