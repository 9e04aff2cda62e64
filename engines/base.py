"""The one small interface every backend implements (checked by tests/test_engines_conformance.py).

Contract
- ``infer(tiles)``: tiles uint8 B x H x W x C (C = bundle input channels), 1 <= B <= max_batch.
  NumPy in -> a new float32 NumPy array B x 1 x h x w out (the caller owns it; never a reused buffer).
  A torch uint8 tensor in (torch and TensorRT backends) -> a torch float32 tensor on the engine's device.
- ``submit(tiles, slot)`` starts the same work asynchronously on stream/slot ``slot`` (0 <= slot < streams)
  and returns a handle; ``handle.result()`` blocks and returns what ``infer`` would have.
  A slot holds one batch in flight; submitting to a busy slot waits for it first. The caller may drop or
  reuse its tiles as soon as ``submit`` returns (NumPy tiles are copied; torch tiles are held by the engine
  until the batch has run).
- ``warmup()`` runs every batch-size bucket once (CUDA graphs captured, TensorRT contexts ready).
- ``close()`` frees device memory; afterwards infer/submit/warmup raise EngineError("engine is closed").
Bad input (wrong dtype, shape, batch over max_batch) raises EngineInputError with the reason.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .bundle import BundleMeta

__all__ = ["Engine", "InferHandle", "BundleGeometry", "EngineError", "EngineInputError", "BackendUnavailable",
           "batch_buckets",
           "bucket_for", "check_tiles", "check_slot", "SlotPool"]


class BundleGeometry:
    """input_shape / map_shape of an engine, read from its bundle (shared by every backend)."""

    meta: BundleMeta

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.meta.input.height, self.meta.input.width, self.meta.input.channels)

    @property
    def map_shape(self) -> tuple[int, int]:
        return (self.meta.map.height, self.meta.map.width)


class EngineError(RuntimeError):
    """An engine could not be opened or failed while running."""


class BackendUnavailable(EngineError):
    """The requested backend (or device/precision) is not available on this machine."""


class EngineInputError(ValueError):
    """Tiles given to an engine do not match its input specification."""


@runtime_checkable
class InferHandle(Protocol):
    def done(self) -> bool: ...

    def result(self) -> np.ndarray: ...


@runtime_checkable
class Engine(Protocol):
    backend: str  # "onnxruntime", "torch", "tensorrt"
    device: str  # "cpu", "cuda:0", ...
    precision: str  # what runs: "fp32" (IEEE), "tf32", "fp16" (FP32 map head), ...
    meta: BundleMeta
    max_batch: int
    streams: int

    @property
    def input_shape(self) -> tuple[int, int, int]:  # H, W, C of one uint8 tile
        ...

    @property
    def map_shape(self) -> tuple[int, int]:  # h, w of one tile's map
        ...

    def infer(self, tiles): ...

    def submit(self, tiles, slot: int = 0) -> InferHandle: ...

    def warmup(self) -> None: ...

    def close(self) -> None: ...


# --- shared helpers for backends (pure functions; added with the backends, contract above unchanged) ---

def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes an engine prepares for: powers of two below max_batch, then max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    buckets.append(max_batch)
    return tuple(buckets)


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``batch`` tiles (a batch is padded up to it)."""
    for size in buckets:
        if batch <= size:
            return size
    raise EngineInputError(f"batch of {batch} tiles is larger than the largest bucket {buckets[-1]}")


def check_tiles(tiles, input_shape: tuple[int, int, int], max_batch: int) -> int:
    """Validate a batch of tiles (NumPy or torch) and return its batch size; EngineInputError otherwise."""
    dtype = getattr(tiles, "dtype", None)
    if dtype is None or str(dtype) not in ("uint8", "torch.uint8"):
        got = dtype if dtype is not None else type(tiles).__name__
        raise EngineInputError(f"tiles must be uint8, got {got}")
    shape = tuple(tiles.shape)
    if len(shape) != 4 or shape[1:] != tuple(input_shape):
        raise EngineInputError(f"tiles must be B x {' x '.join(map(str, input_shape))} (B x H x W x C), "
                               f"got {' x '.join(map(str, shape)) or 'a scalar'}")
    if not 1 <= shape[0] <= max_batch:
        raise EngineInputError(f"batch of {shape[0]} tiles is outside 1..max_batch={max_batch}")
    return shape[0]


def check_slot(slot: int, streams: int) -> None:
    if not 0 <= slot < streams:
        raise EngineInputError(f"slot {slot} is outside 0..{streams - 1} (the engine has {streams} streams)")


class SlotPool:
    """One single-worker thread per slot: ``submit`` returns a Future; a busy slot is waited for first."""

    def __init__(self, streams: int, name: str):
        from concurrent.futures import ThreadPoolExecutor

        self.streams = streams
        self._pools = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-slot{i}")
                       for i in range(streams)]
        self._inflight: list = [None] * streams

    def submit(self, slot: int, fn, *args):
        from concurrent.futures import wait

        check_slot(slot, self.streams)
        previous = self._inflight[slot]
        if previous is not None:
            wait([previous])  # a slot holds one batch in flight
        future = self._pools[slot].submit(fn, *args)
        self._inflight[slot] = future
        return future

    def shutdown(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True)
