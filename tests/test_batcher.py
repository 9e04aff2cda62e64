"""TileBatcher: cross-frame packing, max_delay, slots in flight, per-camera order, failures, drain."""

from __future__ import annotations

import numpy as np
import pytest

from edge_daemon.bench.pipeline import StandInEngine
from inspection.batcher import TileBatcher
from inspection.pipeline import FrameResult, InspectConfig, inspect_frame
from inspection.tiling import tile_grid

CONFIG = InspectConfig(tile_overlap=8)
NINE = (64, 64)  # a 64 x 64 frame is 3 x 3 tiles of 32 with >= 8 px overlap
assert tile_grid(*NINE, 32, 32, 8, 4).count == 9


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ManualHandle:
    def __init__(self, value, slot, size, error=None):
        self.value, self.slot, self.size, self.error, self.ready = value, slot, size, error, False

    def done(self) -> bool:
        return self.ready

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


class ManualEngine(StandInEngine):
    """Stand-in engine whose batches finish only when the test says so; can fail on demand."""

    def __init__(self, streams=1, max_batch=16, auto=False):
        super().__init__(tile=32, stride=4, channels=1, mode="pool", max_batch=max_batch, streams=streams)
        self.handles: list[ManualHandle] = []
        self.auto = auto
        self.fail_result: list[Exception | None] = []  # per submit, in order
        self.fail_submit: Exception | None = None

    def submit(self, tiles, slot=0):
        assert all(h.slot != slot for h in self.handles if not h.ready), f"slot {slot} is busy"
        if self.fail_submit is not None:
            raise self.fail_submit
        error = self.fail_result.pop(0) if self.fail_result else None
        handle = ManualHandle(self.infer(tiles), slot, len(tiles), error)
        handle.ready = self.auto
        self.handles.append(handle)
        return handle


def _frame(value=20, shape=NINE, defect=True):
    frame = np.full(shape, value, np.uint8)
    if defect:
        frame[20:30, 20:30] = 250
    return frame


def test_packs_tiles_of_several_frames_and_cameras():
    engine, clock = ManualEngine(auto=True), FakeClock()
    batcher = TileBatcher(engine, max_batch=16, max_delay_us=1000, clock=clock)
    for i, cam in enumerate(["a", "b", "a"]):
        batcher.add(i, cam, _frame(), CONFIG)
    assert (batcher.pending_frames, batcher.pending_tiles) == (3, 27)
    out = batcher.poll(0)
    assert engine.calls == [16]  # one full batch: frame 0 and 7 tiles of frame 1
    assert [t for t, _ in out] == [0] and batcher.pending_tiles == 11
    clock.now += 0.0005
    assert batcher.poll(0) == [] and engine.calls == [16]  # partial batch waits for max_delay
    clock.now += 0.0006
    out = batcher.poll(0)
    assert engine.calls == [16, 11]
    assert sorted(t for t, _ in out) == [1, 2] and batcher.pending_frames == 0
    expected = inspect_frame(StandInEngine(32, 4, 1, "pool"), _frame(), CONFIG)
    for _, result in out:
        assert isinstance(result, FrameResult) and result.verdict == "FAIL"
        np.testing.assert_allclose(result.anomaly_map, expected.anomaly_map, atol=1e-6)
        assert result.regions == expected.regions


def test_max_delay_zero_launches_at_once_and_batch_capped_by_engine():
    engine = ManualEngine(auto=True, max_batch=4)
    batcher = TileBatcher(engine, max_batch=16, max_delay_us=0, clock=FakeClock())
    batcher.add("t", "cam", _frame(), CONFIG)
    (ticket, result), = batcher.poll(0)
    assert ticket == "t" and result.verdict == "FAIL"
    assert engine.calls == [4, 4, 1]  # engine.max_batch caps the batch


def test_several_slots_in_flight():
    engine, clock = ManualEngine(streams=2, max_batch=9), FakeClock()
    batcher = TileBatcher(engine, max_batch=9, max_delay_us=500, clock=clock)
    for i in range(3):
        batcher.add(i, "cam", _frame(), CONFIG)
    assert batcher.poll(0) == []
    assert batcher.in_flight_batches == 2 and [h.slot for h in engine.handles] == [0, 1]
    assert batcher.pending_tiles == 9  # third frame waits for a free slot
    engine.handles[1].ready = True
    assert batcher.poll(0) == []  # frame 1 done, but frame 0 (same camera) comes first
    assert [h.slot for h in engine.handles] == [0, 1, 1] and batcher.in_flight_batches == 2
    engine.handles[0].ready = True
    assert [t for t, _ in batcher.poll(0)] == [0, 1]
    engine.handles[2].ready = True
    assert [t for t, _ in batcher.poll(0)] == [2]
    assert (batcher.pending_frames, batcher.pending_tiles, batcher.in_flight_batches) == (0, 0, 0)


def test_results_per_camera_in_add_order():
    engine = ManualEngine(streams=3, max_batch=9)
    batcher = TileBatcher(engine, max_batch=9, max_delay_us=0, clock=FakeClock())
    batcher.add("a1", "A", _frame(), CONFIG)
    batcher.add("a2", "A", _frame(), CONFIG)
    batcher.add("b1", "B", _frame(), CONFIG)
    batcher.poll(0)
    engine.handles[1].ready = engine.handles[2].ready = True  # a2 and b1 finish before a1
    assert [t for t, _ in batcher.poll(0)] == ["b1"]
    engine.handles[0].ready = True
    assert [t for t, _ in batcher.poll(0)] == ["a1", "a2"]


def test_engine_failure_completes_frames_with_the_exception():
    engine = ManualEngine(auto=True, max_batch=12)
    engine.fail_result = [None, RuntimeError("device lost")]  # the second batch fails
    batcher = TileBatcher(engine, max_batch=12, max_delay_us=0, clock=FakeClock())
    for i in range(3):  # batches: [f0 9 + f1 3], [f1 6 + f2 6] fails, [f2 3] never launched
        batcher.add(i, "cam", _frame(), CONFIG)
    out = dict(batcher.poll(0))
    assert isinstance(out[0], FrameResult)
    assert isinstance(out[1], RuntimeError) and str(out[1]) == "device lost"
    assert out[2] is out[1]
    assert engine.calls == [12, 12] and batcher.pending_tiles == 0 and batcher.pending_frames == 0
    batcher.add(3, "cam", _frame(), CONFIG)  # the batcher keeps working afterwards
    (ticket, result), = batcher.poll(0)
    assert ticket == 3 and result.verdict == "FAIL"


def test_submit_failure_and_malformed_maps():
    engine = ManualEngine(auto=True)
    batcher = TileBatcher(engine, max_batch=16, max_delay_us=0, clock=FakeClock())
    engine.fail_submit = ValueError("bad batch")
    batcher.add(0, "cam", _frame(), CONFIG)
    (_, result), = batcher.poll(0)
    assert isinstance(result, ValueError) and "bad batch" in str(result)
    engine.fail_submit = None
    engine.infer = lambda tiles: np.zeros((len(tiles), 1, 4, 4), np.float32)  # wrong map shape
    batcher.add(1, "cam", _frame(), CONFIG)
    (_, result), = batcher.poll(0)
    assert isinstance(result, RuntimeError) and "expected (9, 1, 8, 8)" in str(result)


def test_bad_frame_raises_and_queues_nothing():
    batcher = TileBatcher(ManualEngine(auto=True), max_batch=16, max_delay_us=0, clock=FakeClock())
    with pytest.raises(ValueError, match="dtype"):
        batcher.add(0, "cam", np.zeros((64, 64), np.float64), CONFIG)
    assert (batcher.pending_frames, batcher.pending_tiles) == (0, 0)
    assert batcher.poll(0) == []


def test_frame_buffer_may_be_reused_after_add():
    engine = ManualEngine(auto=True)
    batcher = TileBatcher(engine, max_batch=64, max_delay_us=10_000, clock=FakeClock())
    frame = _frame()
    batcher.add(0, "cam", frame, CONFIG)
    frame[:] = 0  # the daemon frees / reuses the shared-memory slot
    (_, result), = batcher.drain(1.0)
    assert result.verdict == "FAIL"  # the defect was copied at add()


def test_drain_flushes_and_times_out():
    engine = ManualEngine(auto=True, max_batch=64)
    batcher = TileBatcher(engine, max_batch=64, max_delay_us=10**9)
    batcher.add(0, "a", _frame(), CONFIG)
    batcher.add(1, "b", _frame(defect=False), CONFIG)
    assert batcher.poll(0) == []  # not full, delay not reached
    out = dict(batcher.drain(1.0))
    assert out[0].verdict == "FAIL" and out[1].verdict == "PASS"
    stuck = ManualEngine()  # handles never finish
    batcher = TileBatcher(stuck, max_batch=64, max_delay_us=0)
    batcher.add(0, "a", _frame(), CONFIG)
    (_, result), = batcher.drain(0.05)
    assert isinstance(result, TimeoutError)
    assert (batcher.pending_frames, batcher.in_flight_batches) == (0, 0)


def test_poll_waits_up_to_timeout_for_the_delay():
    engine = ManualEngine(auto=True)
    batcher = TileBatcher(engine, max_batch=64, max_delay_us=20_000)  # real clock
    batcher.add(0, "a", _frame(), CONFIG)
    assert batcher.poll(0) == []
    out = batcher.poll(1.0)  # returns once the 20 ms delay launched the partial batch
    assert [t for t, _ in out] == [0]


def test_constructor_validates():
    with pytest.raises(ValueError, match="max_batch"):
        TileBatcher(ManualEngine(), max_batch=0, max_delay_us=0)
    with pytest.raises(ValueError, match="max_delay_us"):
        TileBatcher(ManualEngine(), max_batch=1, max_delay_us=-1)


def test_real_onnxruntime_engine_two_streams(tiny_bundle):
    registry = pytest.importorskip("engines.registry")
    real = registry.open_engine(tiny_bundle, backend="onnxruntime", streams=2, max_batch=8, threads=1)
    try:
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (70 + 10 * i, 90), dtype=np.uint8) for i in range(4)]
        batcher = TileBatcher(real, max_batch=8, max_delay_us=0)
        for i, frame in enumerate(frames):
            batcher.add(i, f"cam{i % 2}", frame, CONFIG)
        out = dict(batcher.drain(10.0))
        assert sorted(out) == [0, 1, 2, 3]
        for i, frame in enumerate(frames):
            expected = inspect_frame(real, frame, CONFIG)
            np.testing.assert_allclose(out[i].anomaly_map, expected.anomaly_map, rtol=1e-5, atol=1e-6)
            assert out[i].verdict == expected.verdict
    finally:
        real.close()
