"""Protocol conformance at the wire: a client written from docs/protocol.md alone (raw pyzmq + msgpack, cv2 to
encode images; nothing from edge_daemon.client or edge_daemon.protocol) against the real daemon. Each test
checks statements the page marks (C).
"""

from __future__ import annotations

import json
import math
import time

import cv2
import msgpack
import numpy as np
import pytest
import zmq
from daemon_helpers import DaemonProcess, daemon_config, parse_metrics, scrape, wait_until

pytest.importorskip("onnxruntime")

STRIDE, K = 4, 2  # the tiny bundle's map stride; map_downscale
MAX_W = MAX_H = 256
HARD_LIMIT = 4 * MAX_W * MAX_H * 3 + (1 << 20)
RECORD_FIELDS = {
    "v": int,
    "kind": str,
    "camera_id": str,
    "frame_id": (int, type(None)),
    "capture_ns": (int, type(None)),
    "receive_ns": int,
    "verdict": (str, type(None)),
    "score": (float, type(None)),
    "threshold": (float, type(None)),
    "regions": list,
    "timings_ms": dict,
    "model_id": str,
    "reason": str,
    "code": str,
    "seq": int,
    "seq_epoch": int,
}
CODES = ("parts", "header", "version", "camera_id", "field", "encoding", "payload", "image", "frame_size")
LABELS = ("cam1", "cam2", "_other", "unknown")
SOCKETS = ("frames", "imagezmq")


def header(camera_id, frame_id, encoding, **extra) -> bytes:
    fields = {"v": 1, "camera_id": camera_id, "frame_id": frame_id, "timestamp_ns": 123, "encoding": encoding}
    return msgpack.packb({**fields, **extra})


def raw(camera_id, frame_id, h=32, w=48) -> list[bytes]:
    return [header(camera_id, frame_id, "mono8", width=w, height=h, channels=1), bytes(h * w)]


class Wire:
    """A PUSH camera socket, a SUB on everything, the metrics page; every wait bounded."""

    def __init__(self, ctx: zmq.Context, data: dict):
        ep = data["endpoints"]
        self.ctx, self.ep, self.port = ctx, ep, ep["metrics_port"]
        self.cam = self.socket(zmq.PUSH, ep["ingest"])
        self.sub = self.subscriber([b""])
        self.seen: list[tuple[bytes, dict]] = []
        self.sent = 0

    def socket(self, kind: int, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def subscriber(self, topics) -> zmq.Socket:
        """A SUB whose connection is up (records published before its subscription arrives are not
        delivered to it: wait for the handshake, the subscriptions follow it at once)."""
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100000)
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.connect(self.ep["output"])
        assert monitor.poll(10_000), "no connection to the daemon's output"
        sock.disable_monitor()
        monitor.close(linger=0)
        return sock

    def send(self, parts) -> None:
        self.cam.send_multipart(parts)
        self.sent += 1

    def take(self, sock: zmq.Socket, until, timeout_s: float = 20.0) -> list[tuple[bytes, dict]]:
        got, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline and not until(got):
            if sock.poll(50):
                topic, body = sock.recv_multipart()
                got.append((topic, msgpack.unpackb(body, raw=False)))
        assert until(got), got[-5:]
        return got

    def records(self, n: int, maps: int = 0, timeout_s: float = 20.0) -> list[tuple[bytes, dict]]:
        """The next ``n`` records (and ``maps`` map messages) on the everything-subscriber; all kept in
        ``seen``; returns the records."""

        def enough(got):
            n_maps = sum(t.endswith(b"/map") for t, _ in got)
            return len(got) - n_maps >= n and n_maps >= maps

        got = self.take(self.sub, enough, timeout_s)
        self.seen += got
        return [(t, b) for t, b in got if not t.endswith(b"/map")]

    def drain(self, quiet_s: float = 0.5) -> None:
        while self.sub.poll(int(quiet_s * 1000)):
            topic, body = self.sub.recv_multipart()
            self.seen.append((topic, msgpack.unpackb(body, raw=False)))

    def metrics(self) -> dict[str, float]:
        return parse_metrics(scrape(self.port)[1])


@pytest.fixture(scope="module", params=["multi", "single"])
def wire(request, tmp_path_factory, tiny_bundle):
    tmp = tmp_path_factory.mktemp("conformance")
    path, data = daemon_config(tmp, tiny_bundle, map_downscale=K, process_mode=request.param)
    proc = DaemonProcess(path, tmp / "daemon.log", instance=data["instance"])
    ctx = zmq.Context()
    try:
        proc.wait_ready(data["endpoints"]["metrics_port"], timeout_s=60)
        w = Wire(ctx, data)
        w.metrics_at_start = w.metrics()
        fid = 0
        while not w.sub.poll(0) and fid < 200:  # subscription handshake: frames until one comes back
            w.send(raw("cam1", 10_000 + fid))
            fid += 1
            w.sub.poll(300)
        w.records(fid, maps=fid)
        yield w
        sockets = [w.cam, w.sub]
        for sock in sockets:
            sock.close()
        assert proc.proc.poll() is None, proc.logs()[-3000:]
    finally:
        ctx.term()
        proc.stop()


def test_every_counter_exists_from_the_start(wire):
    m = wire.metrics_at_start
    for label in LABELS:
        for kind in ("received", "answered", "failed", "dropped"):
            assert m[f'edge_frames_{kind}_total{{camera="{label}"}}'] == 0
    for code in CODES:
        assert m[f'edge_protocol_errors_total{{reason="{code}"}}'] == 0
    for socket in SOCKETS:
        assert m[f'edge_transport_events_total{{event="disconnected",socket="{socket}"}}'] == 0


def _frames() -> list[tuple[str, list[bytes], int, int]]:
    """(encoding, parts, height, width) for every encoding."""
    rng = np.random.default_rng(0)
    mono = rng.integers(0, 256, (32, 48), dtype=np.uint8)
    color = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    mono16 = (mono.astype("<u2") << 4).astype("<u2")
    jpeg = cv2.imencode(".jpg", color)[1].tobytes()
    png = cv2.imencode(".png", mono16.astype(np.uint16))[1].tobytes()
    return [
        ("mono8", [header("cam1", 1, "mono8", width=48, height=32, channels=1), mono.tobytes()], 32, 48),
        ("mono16", [header("cam1", 2, "mono16", width=48, height=32, channels=1), mono16.tobytes()], 32, 48),
        ("bgr8", [header("cam1", 3, "bgr8", width=36, height=40, channels=3), color.tobytes()], 40, 36),
        ("rgb8", [header("cam1", 4, "rgb8", width=36, height=40, channels=3), color.tobytes()], 40, 36),
        ("jpeg", [header("cam1", 5, "jpeg"), jpeg], 40, 36),
        ("png", [header("cam1", 6, "png"), png], 32, 48),
    ]


def test_every_encoding_gets_one_verdict_and_a_map(wire):
    frames = _frames()
    for _, parts, _, _ in frames:
        wire.send(parts)
    records = wire.records(len(frames), maps=len(frames))
    maps = {b["frame_id"]: (t, b) for t, b in wire.seen if t == b"cam1/map"}
    assert sorted(b["frame_id"] for _, b in records) == list(range(1, 7))
    seqs = [b["seq"] for _, b in records]
    assert seqs == list(range(seqs[0], seqs[0] + len(frames)))  # +1 per record on the topic
    assert len({b["seq_epoch"] for _, b in records}) == 1
    by_id = {b["frame_id"]: (t, b) for t, b in records}
    for fid, (encoding, _, h, w) in enumerate(frames, start=1):
        topic, rec = by_id[fid]
        assert topic == b"cam1" and rec["kind"] == "verdict" and rec["verdict"] in ("PASS", "FAIL"), encoding
        for field, kind in RECORD_FIELDS.items():
            assert isinstance(rec[field], kind), (encoding, field, rec[field])
        assert rec["code"] == "" and rec["capture_ns"] == 123 and rec["camera_id"] == "cam1"
        assert set(rec["timings_ms"]) >= {"queue", "tile", "infer", "fuse", "verdict", "total"}
        map_topic, body = maps[fid]
        rows, cols = math.ceil(math.ceil(h / STRIDE) / K), math.ceil(math.ceil(w / STRIDE) / K)
        assert map_topic == b"cam1/map" and body["shape"] == [rows, cols] and body["dtype"] == "float32"
        assert body["seq"] == rec["seq"] and body["camera_id"] == "cam1" and body["v"] == 1
        values = np.frombuffer(body["data"], "<f4")
        assert values.size == rows * cols and np.isfinite(values).all()


def _jpeg_claiming(w: int, h: int) -> bytes:
    jpeg = bytearray(cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))[1].tobytes())
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(jpeg)


BAD = [  # parts, topic, frame_id, code
    ([msgpack.packb({"v": 2, "camera_id": "cam1", "frame_id": 7}), b"x"], b"cam1", 7, "version"),
    (
        [msgpack.packb({"v": 1, "camera_id": "cam1", "frame_id": 8, "encoding": "jpeg"}), b"x"],
        b"cam1",
        8,
        "field",
    ),
    ([header("cam1", 9, "jpeg", width=8), b"x"], b"cam1", 9, "field"),
    ([header("cam1", 10, "yuv422"), b"x"], b"cam1", 10, "encoding"),
    ([header("cam1", 11, "mono8", width=4, height=4, channels=1), bytes(15)], b"cam1", 11, "payload"),
    ([header("cam1", 12, "jpeg"), b""], b"cam1", 12, "payload"),
    ([header("cam1", 13, "jpeg"), b"x", b"x"], b"cam1", 13, "parts"),
    ([b"\xc1not msgpack", b"x"], b"unknown", None, "header"),
    ([header("cam1/map", 14, "jpeg"), b"x"], b"unknown", 14, "camera_id"),
    ([header("cam 1", 15, "jpeg"), b"x"], b"unknown", 15, "camera_id"),
    ([header("unknown", 16, "jpeg"), b"x"], b"unknown", 16, "camera_id"),
    ([header("cam1", 17, "jpeg"), b"\xff\xd8\xff"], b"cam1", 17, "image"),
    ([header("cam1", 18, "jpeg"), _jpeg_claiming(0, 0)], b"cam1", 18, "frame_size"),
    ([header("cam1", 19, "jpeg"), _jpeg_claiming(300, 8)], b"cam1", 19, "frame_size"),
    ([header("cam1", 20, "mono8", width=300, height=1, channels=1), bytes(300)], b"cam1", 20, "frame_size"),
    ([header("cam1", 21, "jpeg", timestamp_ns=-1), b"x"], b"cam1", 21, "field"),
]


def test_bad_messages_get_one_error_each_with_ids_and_code(wire):
    before = wire.metrics()
    for parts, _, _, _ in BAD:
        wire.send(parts)
    records = wire.records(len(BAD))
    assert len(records) == len(BAD)
    got = sorted(((t, b["frame_id"] if b["frame_id"] is not None else -1, b["code"]) for t, b in records))
    want = sorted((t, -1 if fid is None else fid, code) for _, t, fid, code in BAD)
    assert got == want
    for topic, rec in records:
        assert rec["kind"] == "error" and rec["reason"] and "\n" not in rec["reason"]
        assert rec["camera_id"] == topic.decode() and rec["verdict"] is None and rec["regions"] == []
    after = wait_until(
        lambda: (m := wire.metrics())['edge_protocol_errors_total{reason="frame_size"}'] >= 3 and m, 10, 0.2
    )
    for code in CODES:
        n = sum(1 for _, _, _, c in BAD if c == code)
        key = f'edge_protocol_errors_total{{reason="{code}"}}'
        assert after[key] - before[key] == n, code


def test_topics_are_prefixes(wire):
    prefix = wire.subscriber([b"cam1"])
    sent = 0
    try:
        deadline = time.monotonic() + 10
        while not prefix.poll(0) and time.monotonic() < deadline:  # join: cam1 frames until one arrives
            wire.send(raw("cam1", 30_000))
            sent += 1
            prefix.poll(300)
        for cam in ("cam10", "cam1-left", "cam1.x", "cam2"):
            wire.send(raw(cam, 31_000))
        sent += 4
        expected = {b"cam1", b"cam1/map", b"cam10", b"cam1-left", b"cam1.x"}
        got = wire.take(prefix, lambda g: {t for t, _ in g} >= expected)
        got += wire.take(prefix, lambda g: not prefix.poll(300))
        assert {t.split(b"/")[0] for t, _ in got} == {b"cam1", b"cam10", b"cam1-left", b"cam1.x"}  # not cam2
    finally:
        prefix.close()
    wire.records(sent)  # the everything-subscriber got them too


def test_configured_camera_keeps_its_numbering_under_id_churn(wire):
    wire.send(raw("cam2", 1))
    ((topic, first),) = wire.records(1)
    assert topic == b"cam2"
    for i in range(1100):
        wire.send([msgpack.packb({"v": 2, "camera_id": f"x{i:04d}"}), b"x"])
    wire.send(raw("cam2", 2))
    records = wire.records(1101)
    ((_, last),) = [r for r in records if r[0] == b"cam2"]
    assert (last["seq"], last["seq_epoch"]) == (first["seq"] + 1, first["seq_epoch"])
    assert {t for t, _ in records} >= {b"x0000", b"x1099"}  # valid unconfigured ids keep their own topics


def test_oversize_costs_the_connection_and_imagezmq_times_out(wire):
    before = wire.metrics()
    big = wire.socket(zmq.PUSH, wire.ep["ingest"])
    req = wire.socket(zmq.REQ, wire.ep["imagezmq"])
    req.setsockopt(zmq.RCVTIMEO, 500)
    try:
        big.send_multipart([header("cam1", 40, "jpeg"), bytes(HARD_LIMIT + 1)])
        req.send_multipart([json.dumps({"msg": "izmq", "jpg_buffer": True}).encode(), bytes(HARD_LIMIT + 1)])
        with pytest.raises(zmq.Again):
            req.recv()

        def counted():
            m = wire.metrics()
            keys = [f'edge_transport_events_total{{event="disconnected",socket="{s}"}}' for s in SOCKETS]
            return all(m[k] > before[k] for k in keys) and m

        wait_until(counted, 15, 0.2, "disconnects counted")
    finally:
        big.close()
        req.close()
    ok = wire.socket(zmq.REQ, wire.ep["imagezmq"])
    ok.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        jpeg = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
        ok.send_multipart([json.dumps({"msg": "izmq", "jpg_buffer": True}).encode(), jpeg])
        assert ok.recv() == b"OK"
        wire.sent += 1
    finally:
        ok.close()
    ((topic, rec),) = wire.records(1)
    assert topic == b"izmq" and rec["kind"] == "verdict" and rec["frame_id"] == 0


def test_accounting_holds_per_label(wire):
    """Runs last: every message sent got exactly one record; metrics agree per camera label."""
    wire.drain()

    def answered(m, label):
        return sum(m[f'edge_frames_{k}_total{{camera="{label}"}}'] for k in ("answered", "failed", "dropped"))

    def settled():
        # ingest and publisher each report a snapshot every 0.5 s: wait until both have reported everything
        m = wire.metrics()
        received = sum(m[f'edge_frames_received_total{{camera="{c}"}}'] for c in LABELS)
        out = sum(answered(m, c) for c in LABELS)
        return m if received == wire.sent and out == wire.sent else None

    m = wait_until(settled, 15, 0.2, f"{wire.sent} messages received and answered")
    for label in LABELS:
        assert m[f'edge_frames_received_total{{camera="{label}"}}'] == answered(m, label), label
    records = [b for t, b in wire.seen if not t.endswith(b"/map")]
    assert len(records) == wire.sent
