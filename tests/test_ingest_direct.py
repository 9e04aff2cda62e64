"""Raw frames received straight into their shared-memory slot (``Socket.recv_into``) must be answered
exactly as the ordinary path answers them: the same records (reason, code, ids), the same descriptors and
the same pixels in the slot, for good frames and every kind of bad one. Both paths of the real ``Ingest``,
in this process: one takes the messages from its socket, the other is handed the same messages."""

from __future__ import annotations

import os
import uuid

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from edge_daemon.config import config_from_mapping
from edge_daemon.ingest import Ingest
from edge_daemon.protocol import encode_header
from edge_daemon.shm import SlotRing
from edge_daemon.transport import ipc_endpoint

pytestmark = pytest.mark.skipif(not hasattr(zmq.Socket, "recv_into"), reason="pyzmq < 26.4: no recv_into")


def _h(fid, enc, w=0, h=0, c=0, cam="cam1"):
    return encode_header(cam, fid, 100 + fid, enc, w, h, c)


RNG = np.random.default_rng(7)
MONO = RNG.integers(0, 256, (24, 40), dtype=np.uint8)
MONO16 = RNG.integers(0, 65536, (8, 16), dtype=np.uint16)
RGB = RNG.integers(0, 256, (16, 20, 3), dtype=np.uint8)
CASES = {
    "mono8": [_h(1, "mono8", 40, 24, 1), MONO.tobytes()],
    "mono16": [_h(2, "mono16", 16, 8, 1), MONO16.tobytes()],
    "rgb8": [_h(3, "rgb8", 20, 16, 3), RGB.tobytes()],
    "bgr8 (ordinary path)": [_h(4, "bgr8", 20, 16, 3), RGB.tobytes()],
    "jpeg (ordinary path)": [_h(5, "jpeg"), cv2.imencode(".jpg", RGB)[1].tobytes()],
    "three parts": [_h(6, "mono8", 40, 24, 1), MONO.tobytes(), b"extra"],
    "four parts": [_h(7, "mono8", 40, 24, 1), MONO.tobytes(), b"x", b"y"],
    "short payload": [_h(8, "mono8", 40, 24, 1), MONO.tobytes()[:-1]],
    "long payload": [_h(9, "mono8", 40, 24, 1), MONO.tobytes() + b"\0"],
    "empty payload": [_h(10, "mono8", 40, 24, 1), b""],
    "over max_frame": [_h(11, "mono8", 65, 2, 1), bytes(130)],
    "one part": [_h(12, "mono8", 40, 24, 1)],
    "bad header, two parts": [b"\xc1", MONO.tobytes()],
    "unknown camera id": [_h(13, "mono8", 40, 24, 1, cam="zz"), MONO.tobytes()],
    "mono8 again": [_h(14, "mono8", 40, 24, 1), MONO.tobytes()],
}


class Side:
    """One Ingest with its peers' sockets (publisher, stats, work-0) bound or connected in ``ctx``."""

    def __init__(self, ctx: zmq.Context, run, queue: dict):
        run.mkdir()
        self.cfg = config_from_mapping({
            "engine": {"bundle": "unused"},
            "endpoints": {"ingest": f"inproc://frames-{uuid.uuid4().hex[:8]}", "metrics_port": None},
            "max_frame": {"width": 64, "height": 64, "channels": 3},
            "queue": queue,
            "runtime_dir": str(run),
            "instance": f"dr{os.getpid()}{uuid.uuid4().hex[:4]}",
            "cameras": [{"id": "cam1"}],
        })
        self.ring = SlotRing.create(self.cfg.instance, self.cfg.queue.slots, self.cfg.max_frame.nbytes)
        self.socks = {}
        for name in ("publisher.ipc", "stats.ipc"):
            self.socks[name] = ctx.socket(zmq.PULL)
            self.socks[name].bind(ipc_endpoint(run, name))
        self.ingest = Ingest(self.cfg, self.ring, ctx)
        self.cam = ctx.socket(zmq.PUSH)
        self.cam.connect(self.cfg.endpoints.ingest)

    def records(self) -> list[dict]:
        out, sock = [], self.socks["publisher.ipc"]
        while sock.poll(200):
            rec = msgpack.unpackb(sock.recv())["record"]
            rec.pop("receive_ns")
            out.append(rec)
        return out

    def queued(self) -> list[tuple[dict, bytes]]:
        out = []
        for desc in self.ingest.queue:
            pixels = self.ring.view(desc["slot"], tuple(desc["shape"]), desc["dtype"]).tobytes()
            out.append(({k: v for k, v in desc.items() if k not in ("receive_ns", "slot")}, pixels))
        return out

    def counters(self) -> dict:
        return {k: v for k, v in self.ingest.metrics.counters.items() if v}

    def close(self):
        self.ingest.close()
        for s in (*self.socks.values(), self.cam):
            s.close(linger=0)
        self.ring.close()


@pytest.fixture
def sides(tmp_path):
    ctx = zmq.Context()
    made = []

    def make(queue):
        made.append(Side(ctx, tmp_path / f"r{len(made)}", queue))
        return made[-1]

    yield make
    for side in made:
        side.close()
    ctx.term()


@pytest.mark.parametrize("queue", [{"slots": 24, "size": 20}, {"slots": 6, "size": 3},
                                   {"slots": 6, "size": 3, "drop_policy": "reject-newest"}])
def test_direct_receive_answers_like_the_ordinary_path(sides, queue):
    """Small queues too: the drop policy applies to a frame received into its slot as to any other."""
    direct, ordinary = sides(queue), sides(queue)
    assert direct.ingest.direct
    taken, receive_direct = [], direct.ingest._receive_direct
    direct.ingest._receive_direct = lambda sock, first: taken.append(receive_direct(sock, first)) or taken[-1]
    for parts in CASES.values():
        direct.cam.send_multipart(parts)
        ordinary.ingest.on_message([zmq.Frame(p) for p in parts], False)
    deadline = 200
    while direct.ingest.received < len(CASES) and deadline:
        direct.ingest.step(20)
        deadline -= 1
    assert direct.ingest.received == ordinary.ingest.received == len(CASES)
    got, want = direct.records(), ordinary.records()
    assert got == want and len(want) >= 8  # the 8 bad ones (and drops with a small queue), one record each
    assert direct.queued() == ordinary.queued()
    assert direct.counters() == ordinary.counters()
    assert direct.ingest.free.in_use == ordinary.ingest.free.in_use == len(direct.ingest.queue)
    # the raw mono8/mono16/rgb8 messages with a readable header, within max_frame: 10 (while slots are free)
    assert taken.count(True) == 10 if queue["slots"] == 24 else taken.count(True) >= 5


def test_a_failure_while_receiving_costs_one_record_and_the_next_message_is_whole(sides, monkeypatch):
    side = sides({"slots": 24, "size": 20})
    real, calls = zmq.Socket.recv_into, []

    def failing_once(self, buffer, nbytes=0, flags=0):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(self, buffer, nbytes=nbytes, flags=flags)

    monkeypatch.setattr(zmq.Socket, "recv_into", failing_once)
    side.cam.send_multipart(CASES["three parts"])  # fails inside: its payload and extra part are discarded
    side.cam.send_multipart(CASES["mono8"])
    for _ in range(200):
        side.ingest.step(20)
        if side.ingest.received == 2:
            break
    (rec,) = side.records()
    assert rec["frame_id"] == 6 and rec["code"] == "internal" and "injected" in rec["reason"]
    ((desc, pixels),) = side.queued()
    assert desc["frame_id"] == 1 and pixels == MONO.tobytes() and len(calls) == 2
