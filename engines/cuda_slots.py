"""CUDA plumbing shared by the torch and TensorRT backends: slots, the batch life cycle, FP32 math mode.

A slot owns a CUDA stream, pinned host input/output buffers and a device input buffer (TensorRT adds a
device output buffer). ``enqueue`` runs one batch on a slot: stage the tiles, ``run(slot)`` (graph replay,
eager forward or TensorRT), copy the maps out, record an event; the returned ``Handle`` waits for the event.

Stream rules, and what each one prevents
- ``ready_streams``: every slot stream waits for the current (default) stream once the engine is built.
  Slot streams are non-blocking, so without it the first batch could race the device buffers' zero-fill and
  the weights' conversion (``.to(fp16, channels_last)``), both queued on the default stream.
- torch tiles: the slot stream waits for the caller's current stream (the tiles may still be being written);
  the tensor is ``record_stream``-ed on the slot stream and the handle keeps a reference to it until the
  batch's event: a temporary (the batcher's ``torch.cat``) dropped by the caller right after ``submit``
  cannot have its memory block handed to someone else before the copy has run.
- NumPy tiles go through the slot's pinned buffer; a slot's previous batch is copied out (its handle's
  ``result()``) before the slot is reused.
- torch maps out are a new tensor cloned on the slot stream and ``record_stream``-ed on the caller's stream.
Every CUDA call goes through ``CudaOps``: tests swap in a fake that records the calls and runs on the CPU.

``fp32_math(precision)``: cuDNN convolutions and cuBLAS matmuls run IEEE FP32 (``"fp32"``) or TF32
(``"tf32"``) inside the block; PyTorch's default for cuDNN convolutions is TF32. The flags are process-wide
(as PyTorch has them): they are set around each forward/capture and restored after.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["CudaOps", "CUDA", "Handle", "Slot", "enqueue", "ready_streams", "finish_pending", "fp32_math"]


class CudaOps:
    """The real CUDA calls (torch.cuda)."""

    def tensor_device(self, device: str):
        return torch.device(device)

    def use_device(self, device: str):
        return torch.cuda.device(torch.device(device))

    def stream(self, device: str):
        return torch.cuda.Stream(device=torch.device(device))

    def current_stream(self, device):
        return torch.cuda.current_stream(torch.device(device))

    def on(self, stream):
        return torch.cuda.stream(stream)

    def event(self):
        return torch.cuda.Event()

    def pinned(self, shape, dtype):
        return torch.empty(shape, dtype=dtype).pin_memory()

    def record_stream(self, tensor, stream) -> None:
        if tensor.is_cuda:  # a CPU tensor's copy has been staged by the time copy_ returns
            tensor.record_stream(stream)

    def synchronize(self, device: str) -> None:
        torch.cuda.synchronize(torch.device(device))

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()


CUDA = CudaOps()


class Handle:
    """Result of one batch; waits for its event and copies out of the slot's pinned buffer at most once."""

    def __init__(self, ops: CudaOps, event, host_out, device_out, batch: int, keep=None):
        self._ops, self._event, self._host_out, self._device_out = ops, event, host_out, device_out
        self._batch, self._keep = batch, keep
        self._value = None

    @property
    def keeps_input(self) -> bool:
        """True while the caller's torch tiles are held (until the batch's event has been waited for)."""
        return self._keep is not None

    def done(self) -> bool:
        return self._value is not None or self._event.query()

    def result(self):
        if self._value is None:
            self._event.synchronize()
            self._keep = None
            if self._device_out is not None:  # torch in -> a fresh device tensor out
                self._value = self._device_out
                self._ops.record_stream(self._value, self._ops.current_stream(self._value.device))
            else:
                self._value = self._host_out[: self._batch].numpy().copy()
            self._host_out = self._device_out = None
        return self._value


class Slot:
    """A stream and its buffers; out_shape = one tile's map (1, h, w); device_out adds a device buffer."""

    def __init__(self, ops: CudaOps, device: str, input_shape, out_shape, max_batch: int,
                 device_out: bool = False):
        where = ops.tensor_device(device)
        self.stream = ops.stream(device)
        self.host_in = ops.pinned((max_batch, *input_shape), torch.uint8)
        self.host_out = ops.pinned((max_batch, *out_shape), torch.float32)
        self.dev_in = torch.zeros((max_batch, *input_shape), dtype=torch.uint8, device=where)
        self.dev_out = (torch.empty((max_batch, *out_shape), dtype=torch.float32, device=where)
                        if device_out else None)
        self.pending: Handle | None = None


def finish_pending(slots) -> None:
    """Wait for every slot's last batch (a function: no loop variable outlives it to pin a slot or result)."""
    for slot in slots:
        if slot.pending is not None:
            slot.pending.result()


def ready_streams(ops: CudaOps, slots, device: str) -> None:
    """Order every slot stream after the work queued so far on the current stream (zero-fill, weights)."""
    current = ops.current_stream(device)
    for slot in slots:
        slot.stream.wait_stream(current)


def enqueue(ops: CudaOps, slot: Slot, tiles, batch: int, device: str, run) -> Handle:
    """Queue one batch on ``slot``: copy in, ``run(slot)`` -> device maps (first ``batch`` rows), copy out."""
    if slot.pending is not None:
        slot.pending.result()  # copy the previous batch out before its buffers are overwritten
    as_torch = isinstance(tiles, torch.Tensor)
    if as_torch:
        slot.stream.wait_stream(ops.current_stream(device))  # the tiles may still be being written
    else:
        slot.host_in[:batch].numpy()[...] = tiles
    with torch.inference_mode(), ops.on(slot.stream):
        slot.dev_in[:batch].copy_(tiles if as_torch else slot.host_in[:batch], non_blocking=True)
        if as_torch:
            ops.record_stream(tiles, slot.stream)
        out = run(slot)
        device_out = out[:batch].clone() if as_torch else None
        if not as_torch:
            slot.host_out[:batch].copy_(out[:batch], non_blocking=True)
        event = ops.event()
        event.record(slot.stream)
    slot.pending = Handle(ops, event, slot.host_out, device_out, batch, keep=tiles if as_torch else None)
    return slot.pending


@contextmanager
def fp32_math(precision: str):
    """cuDNN convolutions and cuBLAS matmuls in IEEE FP32 ("fp32") or TF32 ("tf32") inside the block."""
    tf32 = precision == "tf32"
    conv, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: per-operator fp32_precision
        conv = torch.backends.cudnn.conv
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision = matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = (conv.allow_tf32, matmul.allow_tf32)
    conv.allow_tf32 = matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        conv.allow_tf32, matmul.allow_tf32 = saved
