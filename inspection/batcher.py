"""TileBatcher: packs tiles of many frames (and cameras) into engine batches, returns FrameResults.

Life of a frame
  add()    validates and tiles the frame at once (pipeline.prepare_frame): the tiles are a copy, so the
           caller may free the frame's buffer (shared memory) as soon as add() returns. A bad frame raises
           ValueError and nothing is queued.
  poll()   launches batches: when max_batch tiles are waiting, or the oldest waiting tile has waited
           max_delay_us (by ``clock``). One batch in flight per engine slot (engine.streams slots, via
           engine.submit). Finished batches are collected; a frame whose last tile map came back is fused and
           judged (pipeline.finish_frame). Results are returned per camera in the order frames were added.
  errors   an engine failure (submit or result raising, or a malformed result) completes every frame in the
           batch with that Exception; their other tiles are dropped or ignored. A failure in fusion/verdict
           completes that frame with its Exception. poll never raises for a frame's failure.
  drain()  launches everything now and waits for it; frames still unfinished at the timeout complete with
           TimeoutError (their in-flight batches are abandoned). Used at shutdown.
Tiles of one frame may be split across batches; a batch may hold tiles of several frames. The tiles submitted
for a batch (on the device path a ``torch.cat`` temporary, or a view of a frame's tiles) stay referenced by
the batch until it is collected, besides the engine's own hold (engines/cuda_slots.py).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .pipeline import (
    FrameResult,
    InspectConfig,
    PreparedFrame,
    _device_of,
    finish_frame,
    model_geometry,
    prepare_frame,
)

__all__ = ["TileBatcher"]

_SPIN_S = 0.0002  # wait granularity while a batch is in flight


@dataclass(eq=False)
class _Frame:
    ticket: object
    camera_id: str
    config: InspectConfig
    prepared: PreparedFrame | None
    count: int
    added: float  # clock()
    next_tile: int = 0
    done_tiles: int = 0
    maps: object = None
    first_launch: float | None = None  # perf_counter()
    outcome: FrameResult | Exception | None = None


@dataclass(eq=False)
class _Batch:
    handle: object
    parts: list[tuple[_Frame, int, int]] = field(default_factory=list)
    tiles: object = None  # what was submitted (device path: a torch.cat temporary), held until collected


class TileBatcher:
    def __init__(self, engine, max_batch: int, max_delay_us: int, clock=time.monotonic):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not isinstance(max_delay_us, int) or max_delay_us < 0:
            raise ValueError(f"max_delay_us must be an int >= 0, got {max_delay_us!r}")
        self._engine = engine
        self._geom = model_geometry(engine)
        self._device = _device_of(engine)
        self._limit = min(max_batch, int(engine.max_batch))
        self._delay_s = max_delay_us * 1e-6
        self._clock = clock
        self._waiting: deque[_Frame] = deque()  # frames with tiles not launched yet, add order
        self._cameras: dict[str, deque[_Frame]] = {}
        self._slots: list[_Batch | None] = [None] * max(1, int(getattr(engine, "streams", 1)))
        self._pending_tiles = 0
        self._pending_frames = 0

    # ---- public -------------------------------------------------------------------------------------------
    @property
    def pending_frames(self) -> int:
        """Frames added and not yet returned."""
        return self._pending_frames

    @property
    def pending_tiles(self) -> int:
        """Tiles waiting for a batch (not launched yet)."""
        return self._pending_tiles

    @property
    def in_flight_batches(self) -> int:
        return sum(batch is not None for batch in self._slots)

    def add(self, ticket, camera_id: str, frame: np.ndarray, config: InspectConfig) -> None:
        prepared = prepare_frame(frame, self._geom, config, device=self._device)
        record = _Frame(ticket, camera_id, config, prepared, prepared.grid.count, self._clock())
        self._waiting.append(record)
        self._cameras.setdefault(camera_id, deque()).append(record)
        self._pending_tiles += record.count
        self._pending_frames += 1

    def poll(self, timeout_s: float = 0.0) -> list[tuple[object, FrameResult | Exception]]:
        """Advance everything; return finished frames, waiting up to timeout_s for at least one."""
        deadline = self._clock() + timeout_s
        while True:
            self._advance(force=False)
            out = self._emit()
            now = self._clock()
            if out or now >= deadline:
                return out
            wait = self._next_wait(now)
            if wait is None:
                return out
            time.sleep(min(wait, deadline - now))

    def drain(self, timeout_s: float) -> list[tuple[object, FrameResult | Exception]]:
        """Launch all pending tiles now and wait for every frame (TimeoutError results past timeout_s)."""
        deadline = self._clock() + timeout_s
        out: list[tuple[object, FrameResult | Exception]] = []
        while True:
            self._advance(force=True)
            out += self._emit()
            if self._pending_frames == 0:
                return out
            if self._clock() >= deadline:
                self._abandon(TimeoutError(f"frame not finished within the {timeout_s:g} s drain timeout"))
                return out + self._emit()
            time.sleep(_SPIN_S)

    # ---- internals ----------------------------------------------------------------------------------------
    def _advance(self, force: bool) -> None:
        """Launch and collect until nothing more can happen without waiting."""
        while self._launch(force) | self._collect():
            pass

    def _next_wait(self, now: float) -> float | None:
        """Seconds until something may change, or None when nothing can without another add()."""
        waits = []
        if self.in_flight_batches:
            waits.append(_SPIN_S)
        if self._pending_tiles and None in self._slots:
            waits.append(max(0.0, self._waiting[0].added + self._delay_s - now))
        return min(waits) if waits else None

    def _due(self, force: bool) -> bool:
        if force or self._pending_tiles >= self._limit:
            return True
        return self._clock() - self._waiting[0].added >= self._delay_s

    def _launch(self, force: bool) -> bool:
        launched = False
        while self._pending_tiles and None in self._slots and self._due(force):
            launched = True
            slot = self._slots.index(None)
            batch = _Batch(handle=None)
            chunks = []
            room = self._limit
            while room and self._waiting:
                frame = self._waiting[0]
                take = min(room, frame.count - frame.next_tile)
                chunks.append(frame.prepared.tiles[frame.next_tile:frame.next_tile + take])
                batch.parts.append((frame, frame.next_tile, frame.next_tile + take))
                if frame.first_launch is None:
                    frame.first_launch = time.perf_counter()
                frame.next_tile += take
                room -= take
                self._pending_tiles -= take
                if frame.next_tile == frame.count:
                    self._waiting.popleft()
            batch.tiles = _concat(chunks)
            try:
                batch.handle = self._engine.submit(batch.tiles, slot)
            except Exception as exc:  # noqa: BLE001 - reported per frame
                self._fail_batch(batch, exc)
                continue
            self._slots[slot] = batch
        return launched

    def _collect(self) -> bool:
        collected = False
        for slot, batch in enumerate(self._slots):
            if batch is None or not batch.handle.done():
                continue
            collected = True
            self._slots[slot] = None
            batch.tiles = None
            try:
                maps = batch.handle.result()
                self._scatter(batch, maps)
            except Exception as exc:  # noqa: BLE001 - reported per frame
                self._fail_batch(batch, exc)
        return collected

    def _scatter(self, batch: _Batch, maps) -> None:
        total = sum(end - start for _, start, end in batch.parts)
        expected = (total, 1) + tuple(self._engine.map_shape)
        if tuple(maps.shape) != expected:
            raise RuntimeError(f"engine returned maps of shape {tuple(maps.shape)}, expected {expected}")
        offset = 0
        for frame, start, end in batch.parts:
            n = end - start
            if frame.outcome is None:
                if frame.maps is None:
                    frame.maps = _empty_maps(maps, frame.count)
                frame.maps[start:end] = maps[offset:offset + n]
                frame.done_tiles += n
                if frame.done_tiles == frame.count:
                    self._finish(frame)
            offset += n

    def _finish(self, frame: _Frame) -> None:
        infer_ms = (time.perf_counter() - frame.first_launch) * 1e3
        try:
            frame.outcome = finish_frame(frame.prepared, frame.maps, self._geom, frame.config, infer_ms)
        except Exception as exc:  # noqa: BLE001 - reported per frame
            frame.outcome = exc
        frame.prepared = frame.maps = None

    def _fail_batch(self, batch: _Batch, exc: Exception) -> None:
        for frame, _, _ in batch.parts:
            self._fail(frame, exc)

    def _fail(self, frame: _Frame, exc: Exception) -> None:
        if frame.outcome is not None:
            return
        frame.outcome = exc
        self._pending_tiles -= frame.count - frame.next_tile
        if frame.next_tile < frame.count:
            self._waiting.remove(frame)
        frame.next_tile = frame.count
        frame.prepared = frame.maps = None

    def _abandon(self, exc: Exception) -> None:
        self._slots = [None] * len(self._slots)
        for queue in self._cameras.values():
            for frame in queue:
                self._fail(frame, exc)

    def _emit(self) -> list[tuple[object, FrameResult | Exception]]:
        out = []
        for camera_id in list(self._cameras):
            queue = self._cameras[camera_id]
            while queue and queue[0].outcome is not None:
                frame = queue.popleft()
                out.append((frame.ticket, frame.outcome))
                self._pending_frames -= 1
            if not queue:
                del self._cameras[camera_id]
        return out


def _concat(chunks: list):
    if len(chunks) == 1:
        return chunks[0]
    if isinstance(chunks[0], np.ndarray):
        return np.concatenate(chunks)
    import torch

    return torch.cat(chunks)


def _empty_maps(maps, count: int):
    if isinstance(maps, np.ndarray):
        return np.empty((count,) + maps.shape[1:], dtype=np.float32)
    import torch

    return torch.empty((count,) + tuple(maps.shape[1:]), dtype=torch.float32, device=maps.device)
