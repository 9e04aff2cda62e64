"""The single-process mode in this process (deterministic): the real ``SingleProcess`` loop (ingest, the
worker's FrameInspector, publisher joined by calls) with a stand-in engine, inproc camera and output
sockets, and the supervisor's stats socket played by the test. Every message gets exactly one record, the
queue and drop policies hold, frames are not copied, the stop command drains and reports both counts."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from edge_daemon.bench.pipeline import StandInEngine
from edge_daemon.config import ConfigError, config_from_mapping
from edge_daemon.frames import FrameIn, decode_frame, decode_into
from edge_daemon.metrics import Aggregator
from edge_daemon.protocol import encode_header
from edge_daemon.shm import ShmError, SlotRing
from edge_daemon.single import LocalSlots, SingleProcess
from edge_daemon.transport import ipc_endpoint


class Harness:
    def __init__(self, queue: dict, maps: int = 0, credit: int = 8):
        self.run_dir = tempfile.mkdtemp(prefix="es-", dir="/tmp")
        instance = f"s{uuid.uuid4().hex[:8]}"
        self.cfg = config_from_mapping({
            "engine": {"bundle": "unused", "max_batch": 4, "max_delay_us": 0},
            "endpoints": {"ingest": f"inproc://frames-{instance}", "output": f"inproc://out-{instance}",
                          "metrics_port": None},
            "max_frame": {"width": 64, "height": 64, "channels": 3},
            "queue": {**queue, "worker_credit": credit},
            "runtime_dir": self.run_dir,
            "instance": instance,
            "map_downscale": maps,
            "process_mode": "single",
            "inspection": {"tile_overlap": 0},
            "cameras": [{"id": "cam1"}],
        })
        self.ctx = zmq.Context()
        self.stats = self._sock(zmq.PULL)
        self.stats.bind(ipc_endpoint(self.cfg.runtime_path, "stats.ipc"))
        self.engine = StandInEngine(tile=32, stride=4, channels=1, mode="pool", max_batch=4)
        self.single = SingleProcess(self.cfg, self.engine, self.ctx)
        self.sub = self._sock(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.cfg.endpoints.output)
        self.cam = self._sock(zmq.PUSH)
        self.cam.setsockopt(zmq.SNDHWM, 10000)
        self.cam.connect(self.cfg.endpoints.ingest)
        self.messages: list[tuple[bytes, dict]] = []
        self.reports: list[dict] = []

    def _sock(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def step(self) -> None:
        self.single.step(idle_wait_ms=0)
        while self.sub.poll(0):
            topic, body = self.sub.recv_multipart()
            self.messages.append((topic, msgpack.unpackb(body, raw=False)))
        while self.stats.poll(0):
            self.reports.append(msgpack.unpackb(self.stats.recv(), raw=False))

    def pump(self, until, timeout_s: float = 10.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.step()
            if until():
                return
            time.sleep(0.001)
        raise TimeoutError(f"not reached within {timeout_s} s; {len(self.records())} records")

    def records(self) -> list[dict]:
        return [body for topic, body in self.messages if not topic.endswith(b"/map")]

    def close(self) -> None:
        self.single.close()
        for sock in (self.stats, self.sub, self.cam):
            sock.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def harness():
    made = []

    def make(**kwargs):
        made.append(Harness(**kwargs))
        return made[-1]

    yield make
    for h in made:
        h.close()


def _raw(fid: int, img: np.ndarray, encoding: str = "mono8") -> list[bytes]:
    channels = 1 if img.ndim == 2 else img.shape[2]
    return [encode_header("cam1", fid, 1000 + fid, encoding, img.shape[1], img.shape[0], channels),
            img.tobytes()]


def _jpeg(fid: int, img: np.ndarray) -> list[bytes]:
    return [encode_header("cam1", fid, 1000 + fid, "jpeg"), cv2.imencode(".jpg", img)[1].tobytes()]


def test_every_message_one_record_with_maps_and_accounting(harness):
    h = harness(queue={"slots": 24, "size": 16}, maps=2)
    rng = np.random.default_rng(0)
    mono = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    color = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    msgs = [_raw(0, mono), _raw(1, color, "bgr8"), _raw(2, color, "rgb8"), _jpeg(3, color),
            [b"\xc1 not msgpack", b"x"], _raw(5, mono)[:1], [encode_header("cam1", 6, 1, "mono8", 10, 10, 1),
                                                           b"short"]]
    for m in msgs:
        h.cam.send_multipart(m)
    h.pump(lambda: len(h.records()) == len(msgs))
    by_id = {}
    for r in h.records():
        by_id.setdefault(r["frame_id"], []).append(r)
    assert sorted(k for k in by_id if k is not None) == [0, 1, 2, 3, 5, 6] and len(by_id[None]) == 1
    assert all(len(v) == 1 for v in by_id.values())
    assert [by_id[i][0]["kind"] for i in range(4)] == ["verdict"] * 4
    assert {by_id[i][0]["kind"] for i in (5, 6)} == {"error"}
    assert all(r["receive_ns"] >= r["capture_ns"] for i in range(4) for r in by_id[i])
    assert all({"queue", "tile", "infer", "fuse", "verdict", "total"} <= set(by_id[i][0]["timings_ms"])
               for i in range(4))
    maps = [body for topic, body in h.messages if topic.endswith(b"/map")]
    assert len(maps) == 4 and maps[0]["shape"] == [6, 8]  # 48x64 frame, stride 4, down-scaled by 2
    # the pool model scores the frame itself: the verdict score is the frame's mean brightness map maximum
    assert by_id[0][0]["score"] == pytest.approx(
        cv2.GaussianBlur(mono.reshape(12, 4, 16, 4).mean(axis=(1, 3)).astype(np.float32) / 255, (0, 0),
                         1.0, borderType=cv2.BORDER_REFLECT).max(), rel=1e-5)
    # metrics of the three parts in one snapshot: received = answered + failed + dropped
    totals = Aggregator()
    totals.update("single", h.single.snapshot())
    c = totals.totals().counters
    total = {n: sum(v for (name, _), v in c.items() if name == f"edge_frames_{n}_total")
             for n in ("received", "answered", "failed", "dropped")}
    assert total["received"] == len(msgs) == total["answered"] + total["failed"] + total["dropped"]
    assert h.single.ingest.free.in_use == 0 and h.single.inspector.pending == 0


@pytest.mark.parametrize("policy", ["drop-oldest", "reject-newest"])
def test_queue_and_drop_policies_hold(harness, policy):
    """Credit 1 and a queue of 2: of 6 frames already in the socket, one goes to the worker at once, two
    wait, three are dropped by the policy; each gets one record."""
    h = harness(queue={"slots": 4, "size": 2, "drop_policy": policy}, credit=1)
    frame = np.zeros((32, 32), np.uint8)
    for fid in range(6):
        h.cam.send_multipart(_raw(fid, frame))
    h.pump(lambda: len(h.records()) == 6)
    kinds = {r["frame_id"]: (r["kind"], r["reason"]) for r in h.records()}
    assert len(kinds) == 6
    dropped = sorted(f for f, (kind, _) in kinds.items() if kind == "drop")
    assert dropped == ([1, 2, 3] if policy == "drop-oldest" else [3, 4, 5])
    assert {kinds[f][1] for f in dropped} == {f"queue full ({policy})"}
    assert h.single.ingest.free.in_use == 0


def test_raw_frames_are_not_copied_and_slots_let_go():
    payload = bytearray(np.arange(48 * 64, dtype=np.uint8).tobytes())
    frame = FrameIn("cam1", 1, 0, 0, "mono8", memoryview(payload), (48, 64), "uint8")
    pixels = decode_frame(frame, 64, 64, 64 * 64 * 3)
    assert pixels.shape == (48, 64) and np.shares_memory(pixels, np.frombuffer(payload, np.uint8))
    bgr = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    color = FrameIn("cam1", 2, 0, 0, "bgr8", memoryview(bgr.tobytes()), (8, 8, 3), "uint8")
    assert (decode_frame(color, 64, 64, 64 * 64 * 3) == bgr[:, :, ::-1]).all()  # converted: a new array
    # the same frame through shared memory: copied, same pixels (the two modes store frames alike)
    ring = SlotRing.create(f"lc{uuid.uuid4().hex[:6]}", 2, 64 * 64 * 3)
    try:
        shape, dtype = decode_into(color, ring, 1, 64, 64)
        assert (ring.view(1, shape, dtype) == bgr[:, :, ::-1]).all()
    finally:
        ring.close()
    slots = LocalSlots(2, 64 * 64 * 3)
    slots.keep(0, pixels)
    assert slots.view(0, (48, 64), "uint8") is pixels
    slots.forget(0)
    with pytest.raises(ShmError, match="does not hold"):
        slots.view(0, (48, 64), "uint8")


def test_stop_drains_then_reports_received_and_published(harness):
    h = harness(queue={"slots": 24, "size": 16})
    frame = np.zeros((64, 64), np.uint8)
    for fid in range(10):
        h.cam.send_multipart(_raw(fid, frame))
    h.single.ingest.on_control({"t": "stop", "timeout_s": 5.0})  # takes what is in the socket, then closes it
    assert h.single.ingest.received == 10
    h.single.run(lambda: False)  # returns once drained
    # the reports travel over ipc (an I/O thread each side): wait for them to arrive, do not poll once
    h.pump(lambda: {"drained", "published"} <= {r["t"] for r in h.reports})
    reports = {r["t"]: r for r in h.reports}
    assert reports["drained"]["received"] == 10 and reports["published"]["count"] == 10
    assert len(h.records()) == 10 and {r["kind"] for r in h.records()} == {"verdict"}


def test_single_mode_needs_one_worker():
    with pytest.raises(ConfigError, match="process_mode"):
        config_from_mapping({"engine": {"bundle": "x"}, "workers": 2, "process_mode": "single"})
    with pytest.raises(ConfigError, match="process_mode: must be one of multi, single"):
        config_from_mapping({"engine": {"bundle": "x"}, "process_mode": "threads"})
    assert config_from_mapping({"engine": {"bundle": "x"}}).process_mode == "multi"
