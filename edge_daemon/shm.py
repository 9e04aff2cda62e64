"""A ring of pre-allocated frame slots in one POSIX shared-memory segment.

The supervisor creates the segment (``SlotRing.create``) sized ``slots x slot_bytes`` from the configured
maximum frame; ingest and workers attach (``SlotRing.attach``). Only descriptors (slot, shape, dtype) travel
between processes. Ownership of slots is single-writer: ingest alone holds the free list (``FreeList``),
workers hand slot ids back on a socket, so allocation needs no cross-process lock.

Segment names carry the daemon instance prefix ``edge-inspect-<instance>-``; ``cleanup_stale`` unlinks the
leftovers of a daemon that was killed, at the next start.
"""

from __future__ import annotations

import os
from collections import deque
from contextlib import contextmanager
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

__all__ = ["SlotRing", "FreeList", "segment_prefix", "cleanup_stale", "ShmError"]

ALIGN = 64
SHM_DIR = Path("/dev/shm")


class ShmError(RuntimeError):
    """A shared-memory slot was used outside its bounds or ownership."""


def segment_prefix(instance: str) -> str:
    return f"edge-inspect-{instance}-"


def cleanup_stale(instance: str) -> list[str]:
    """Unlink segments left by an earlier daemon of this instance; return their names."""
    prefix = segment_prefix(instance)
    removed = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.iterdir():
        if path.name.startswith(prefix):
            try:
                path.unlink()
                removed.append(path.name)
            except FileNotFoundError:
                pass
    return removed


@contextmanager
def _untracked():
    """Attach without registering in multiprocessing's resource tracker (it would unlink the segment
    when the attaching process exits; Python < 3.13 has no track=False)."""
    original = resource_tracker.register, resource_tracker.unregister
    resource_tracker.register = resource_tracker.unregister = lambda name, rtype: None
    try:
        yield
    finally:
        resource_tracker.register, resource_tracker.unregister = original


class SlotRing:
    """``slots`` fixed-size byte slots; ``view(slot, shape, dtype)`` is a NumPy view into one of them."""

    def __init__(self, shm: shared_memory.SharedMemory, slots: int, slot_bytes: int, owner: bool):
        self._shm = shm
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.owner = owner
        self.name = shm.name

    @staticmethod
    def _stride(slot_bytes: int) -> int:
        return (slot_bytes + ALIGN - 1) // ALIGN * ALIGN

    @classmethod
    def create(cls, instance: str, slots: int, slot_bytes: int) -> SlotRing:
        if slots < 1 or slot_bytes < 1:
            raise ShmError(f"a slot ring needs slots >= 1 and slot_bytes >= 1, got {slots}, {slot_bytes}")
        name = f"{segment_prefix(instance)}{os.getpid()}"
        with _untracked():
            shm = shared_memory.SharedMemory(name=name, create=True, size=slots * cls._stride(slot_bytes))
        return cls(shm, slots, slot_bytes, owner=True)

    @classmethod
    def attach(cls, name: str, slots: int, slot_bytes: int) -> SlotRing:
        with _untracked():
            shm = shared_memory.SharedMemory(name=name, create=False)
        if shm.size < slots * cls._stride(slot_bytes):
            shm.close()
            raise ShmError(f"segment {name} is {shm.size} bytes, expected {slots} x {slot_bytes}")
        return cls(shm, slots, slot_bytes, owner=False)

    def view(self, slot: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        if not 0 <= slot < self.slots:
            raise ShmError(f"slot {slot} out of range [0, {self.slots})")
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > self.slot_bytes:
            raise ShmError(f"frame of {nbytes} bytes does not fit a {self.slot_bytes}-byte slot")
        offset = slot * self._stride(self.slot_bytes)
        return np.ndarray(shape, dtype=dtype, buffer=self._shm.buf, offset=offset)

    def close(self) -> None:
        """Detach; the owner also unlinks the segment. Views must be dropped before."""
        try:
            self._shm.close()
        except BufferError:  # a view is still alive: the mapping goes with the process
            pass
        if self.owner:
            try:
                with _untracked():
                    self._shm.unlink()
            except FileNotFoundError:
                pass


class FreeList:
    """Slot ids not in use; owned by exactly one process (ingest). Double frees raise."""

    def __init__(self, slots: int):
        self._free = deque(range(slots))
        self._used: set[int] = set()

    def acquire(self) -> int | None:
        if not self._free:
            return None
        slot = self._free.popleft()
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._used:
            raise ShmError(f"slot {slot} released but not in use")
        self._used.remove(slot)
        self._free.append(slot)

    @property
    def in_use(self) -> int:
        return len(self._used)

    @property
    def available(self) -> int:
        return len(self._free)
