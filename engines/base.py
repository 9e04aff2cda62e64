"""The one small interface every backend implements (checked by tests/test_engines_conformance.py).

Contract
- ``infer(tiles)``: tiles uint8 B x H x W x C (C = bundle input channels), 1 <= B <= max_batch.
  NumPy in -> a new float32 NumPy array B x 1 x h x w out (the caller owns it; never a reused buffer).
  A torch uint8 tensor in (torch and TensorRT backends) -> a torch float32 tensor on the engine's device.
- ``submit(tiles, slot)`` starts the same work asynchronously on stream/slot ``slot`` (0 <= slot < streams)
  and returns a handle; ``handle.result()`` blocks and returns what ``infer`` would have.
  A slot holds one batch in flight; submitting to a busy slot waits for it first.
- ``warmup()`` runs every batch-size bucket once (CUDA graphs captured, TensorRT contexts ready).
- ``close()`` frees device memory; the engine is unusable afterwards.
Bad input (wrong dtype, shape, batch over max_batch) raises EngineInputError with the reason.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .bundle import BundleMeta

__all__ = ["Engine", "InferHandle", "EngineError", "EngineInputError", "BackendUnavailable"]


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
    precision: str  # "fp32" or "fp16"
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
