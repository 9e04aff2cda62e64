"""Issue 12: what an integrator and then an attacker found in ingest and the protocol, one regression test per
reproduction (each failed before its fix), in-process (ingest + publisher objects, ``InProcessDaemon``) and
then through the real daemon.

1 topic injection   2 seq eviction   3 per-camera metrics   4 bursts while idle   5 JPEG SOF beyond 64 KiB
6 frame_id echo   7 imagezmq shapes   8 0x0 images   9 over-size messages (and imagezmq REQ senders)
"""

from __future__ import annotations

import json

import cv2
import msgpack
import numpy as np
import pytest
import zmq
from daemon_helpers import DaemonProcess, collect, daemon_config, handshake, parse_metrics, scrape, wait_until
from ingest_harness import InProcessDaemon, raw_frame

from edge_daemon.client import FramePublisher, VerdictSubscriber
from edge_daemon.frames import encoded_size, parse_imagezmq
from edge_daemon.metrics import render
from edge_daemon.protocol import ProtocolError, decode_header, encode_header


@pytest.fixture
def daemon():
    h = InProcessDaemon()
    try:
        yield h
    finally:
        h.close()


def _bad(camera_id, **extra) -> list[bytes]:
    return [msgpack.packb({"v": 2, "camera_id": camera_id, **extra}), b"x"]


def _jpeg(h: int = 16, w: int = 16) -> bytes:
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def _label_sets(counters: dict, name: str) -> dict[tuple, float]:
    return {labels: v for (n, labels), v in counters.items() if n == name}


# ---- 1. topic injection ---------------------------------------------------------------------------------

HOSTILE_IDS = ["cam1/map", "cam1\r\nx", "a b", "x" * 65, "tab\there", "\x00", "ünï", "", "_other", "unknown"]
HOSTILE_IDS += [7]


def test_1_bad_camera_ids_are_answered_on_unknown_only(daemon):
    for cam in HOSTILE_IDS:
        daemon.camera.send_multipart(_bad(cam))
    daemon.pump(lambda: len(daemon.messages) == len(HOSTILE_IDS), what="one record per message")
    assert {topic for topic, _ in daemon.messages} == {b"unknown"}
    assert {body["camera_id"] for _, body in daemon.records()} == {"unknown"}
    text = render(_metrics(daemon))
    assert "\r" not in text and "cam1/map" not in text and "a b" not in text


def _metrics(daemon):
    from edge_daemon.metrics import Metrics

    m = Metrics()
    m.counters = daemon.counters()
    return m


def test_1_subscriber_of_cam1_with_maps_survives_injection(daemon):
    out = daemon.cfg.endpoints.output
    with VerdictSubscriber(out, cameras=["cam1"], maps=True, context=daemon.ctx) as sub:
        got, fid = None, 0
        while got is None and fid < 200:  # subscription handshake: frames until one comes back
            daemon.camera.send_multipart(raw_frame("cam1", fid))
            daemon.settle(0.02)
            got, fid = sub.recv(0.05), fid + 1
        assert got is not None
        while sub.recv(0.05) is not None:
            pass
        daemon.camera.send_multipart(_bad("cam1/map"))
        daemon.camera.send_multipart(raw_frame("cam1", 1000))
        daemon.settle()
        items = [sub.recv(0.2) for _ in range(3)]  # before the fix: KeyError 'data' here
    kinds = [(type(i).__name__, i.frame_id) for i in items if i is not None]
    assert kinds == [("Verdict", 1000), ("AnomalyMap", 1000)], kinds


# ---- 2. seq eviction --------------------------------------------------------------------------------------


def test_2_id_churn_cannot_reset_a_configured_cameras_seq(daemon):
    for fid in range(14):
        daemon.camera.send_multipart(raw_frame("cam1", fid))
    daemon.pump(lambda: len(daemon.records()) == 14, what="cam1 records")
    assert [b["seq"] for _, b in daemon.records()] == list(range(14))
    epoch = daemon.records()[0][1]["seq_epoch"]
    for i in range(1100):
        daemon.camera.send_multipart(_bad(f"x{i:04d}"))
    daemon.camera.send_multipart(raw_frame("cam1", 14))
    daemon.pump(lambda: len(daemon.records()) == 14 + 1100 + 1, what="all records")
    last = [b for t, b in daemon.records() if t == "cam1"][-1]
    assert (last["frame_id"], last["seq"], last["seq_epoch"]) == (14, 14, epoch)


def test_2_a_forgotten_unconfigured_camera_is_visible_to_its_subscriber(daemon):
    """An unconfigured id's counter may be forgotten under churn; its numbering then restarts with a new
    ``seq_epoch``, and VerdictSubscriber counts that as a reset (records in between may be missing)."""
    out = daemon.cfg.endpoints.output
    with VerdictSubscriber(out, cameras=["late"], context=daemon.ctx) as sub:
        fid = 0
        while sub.recv(0.02) is None and fid < 200:
            daemon.camera.send_multipart(raw_frame("late", fid))
            daemon.settle(0.02)
            fid += 1
        before = [b for t, b in daemon.records() if t == "late"][-1]
        for i in range(1100):
            daemon.camera.send_multipart(_bad(f"x{i:04d}"))
        daemon.camera.send_multipart(raw_frame("late", 5000))
        daemon.pump(lambda: any(b["frame_id"] == 5000 for t, b in daemon.records() if t == "late"))
        items = collect_all(sub)
    after = [b for t, b in daemon.records() if t == "late"][-1]
    assert after["seq_epoch"] != before["seq_epoch"] and after["seq"] == 0
    assert [i.frame_id for i in items][-1] == 5000
    assert sub.resets == 1 and sub.resets_by_camera == {"late": 1}


def collect_all(sub, timeout_s: float = 0.2) -> list:
    out = []
    while (item := sub.recv(timeout_s)) is not None:
        out.append(item)
    return out


# ---- 3. per-camera metrics --------------------------------------------------------------------------------


def test_3_accounting_per_label_holds_under_id_churn(daemon):
    daemon.camera.send_multipart(raw_frame("late-cam", 1))
    for i in range(70):
        daemon.camera.send_multipart(_bad(f"z{i:02d}"))
    daemon.camera.send_multipart(raw_frame("cam1", 2))
    daemon.pump(lambda: len(daemon.records()) == 72, what="72 records")
    c = daemon.counters()
    received = _label_sets(c, "edge_frames_received_total")
    for labels, n in received.items():
        out = sum(c.get((k, labels), 0) for k in _OUTCOMES)
        assert out == n, (labels, n, out)
    for name in _OUTCOMES:  # no outcome under a label that received nothing
        assert all(labels in received for labels in _label_sets(c, name)), name
    assert sum(received.values()) == 72
    assert received[(("camera", "cam1"),)] == 1 and received[(("camera", "_other"),)] == 71
    errors = _label_sets(c, "edge_protocol_errors_total")
    assert all(dict(labels).keys() == {"reason"} for labels in errors)
    assert errors[(("reason", "version"),)] == 70
    assert c[("edge_frames_dropped_total", (("camera", "cam2"),))] == 0  # zero counters are present


_KINDS = ("answered", "failed", "dropped")
_OUTCOMES = ("edge_frames_answered_total", "edge_frames_failed_total", "edge_frames_dropped_total")


# ---- 4. bursts while the worker is idle -------------------------------------------------------------------


@pytest.mark.parametrize("n", [12, 16])
def test_4_burst_into_an_idle_worker_drops_nothing(n):
    """configs/demo.yaml's queue (8 waiting, credit 8, 24 slots): a burst already inside the socket is
    dispatched as it is read; before the fix ingest read up to 64 messages before dispatching any."""
    daemon = InProcessDaemon(transport="inproc", queue={"slots": 24, "size": 8, "worker_credit": 8})
    try:
        for fid in range(n):
            daemon.camera.send_multipart(raw_frame("cam1", fid, 16, 16))
        daemon.step()  # one loop iteration reads the whole burst
        daemon.pump(lambda: len(daemon.records()) == n, what=f"{n} records")
        kinds = [b["kind"] for _, b in daemon.records()]
    finally:
        daemon.close()
    assert kinds == ["verdict"] * n


# ---- 5. JPEG header beyond 64 KiB --------------------------------------------------------------------------


def _with_comments(jpeg: bytes, sizes) -> bytes:
    segments = b"".join(b"\xff\xfe" + (s + 2).to_bytes(2, "big") + bytes([0x41]) * s for s in sizes)
    return jpeg[:2] + segments + jpeg[2:]


def test_5_jpeg_with_large_segments_before_sof_is_read():
    jpeg = _with_comments(_jpeg(16, 16), [60000, 60000])
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED).shape == (16, 16, 3)
    assert encoded_size(jpeg, "jpeg") == (16, 16)
    daemon = InProcessDaemon(max_frame=(256, 256, 3))  # payload limit 196608 bytes > 120 kB
    try:
        daemon.camera.send_multipart([encode_header("cam1", 3, 1, "jpeg"), jpeg])
        daemon.pump(lambda: daemon.records(), what="a record")
    finally:
        daemon.close()
    ((_, rec),) = daemon.records()
    assert rec["kind"] == "verdict", rec


def test_5_jpeg_header_scan_is_bounded():
    """Thousands of tiny segments before SOF: refused after a bounded number of markers (documented)."""
    jpeg = _with_comments(_jpeg(16, 16), [0] * 5000)
    assert encoded_size(jpeg, "jpeg") is None
    assert encoded_size(_with_comments(_jpeg(16, 16), [0] * 100), "jpeg") == (16, 16)


# ---- 6. frame_id echoed whenever readable -----------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        {"v": 2, "camera_id": "cam1", "frame_id": 5, "encoding": "mono8", "width": True},
        {"v": 1, "camera_id": "cam1", "frame_id": 5, "encoding": "mono8", "width": True},
        {"v": 1, "camera_id": "cam1", "frame_id": 5, "timestamp_ns": "x", "encoding": "jpeg"},
        {"v": 1, "camera_id": "c/1", "frame_id": 5, "timestamp_ns": 1, "encoding": "jpeg"},
        {"camera_id": "cam1", "frame_id": 5},
    ],
)
def test_6_frame_id_is_echoed_when_readable(daemon, header):
    with pytest.raises(ProtocolError) as info:
        decode_header(msgpack.packb(header))
    assert info.value.frame_id == 5
    daemon.camera.send_multipart([msgpack.packb(header), b"x"])
    daemon.camera.send_multipart([msgpack.packb(header), b"x", b"third part"])
    daemon.pump(lambda: len(daemon.records()) == 2, what="two records")
    assert [b["frame_id"] for _, b in daemon.records()] == [5, 5]


# ---- 7. imagezmq shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, nbytes, reason",
    [
        ([2**62 + 1, 4], "uint8", 4, "needs"),
        ([2**62, 2**62, 3], "uint16", 16, "needs"),
        ([True, True], "uint8", 1, "unsupported array shape"),
        ([4, 4, False], "uint8", 16, "unsupported array shape"),
        ([4.0, 4], "uint8", 16, "unsupported array shape"),
    ],
)
def test_7_imagezmq_shape_validation(shape, dtype, nbytes, reason):
    md = json.dumps({"msg": "izmq", "dtype": dtype, "shape": shape}).encode()
    with pytest.raises(ProtocolError) as info:
        parse_imagezmq([zmq.Frame(md), zmq.Frame(bytes(nbytes))], 1, 10**6, lambda cam: 0)
    assert reason in info.value.reason and info.value.camera_id == "izmq"


def test_7_imagezmq_shapes_through_ingest_are_protocol_errors():
    daemon = InProcessDaemon(imagezmq=True)
    try:
        req = daemon.connect(daemon.cfg.endpoints.imagezmq, zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 5000)
        for shape, n in (([2**62 + 1, 4], 4), ([True, True], 1)):
            md = json.dumps({"msg": "izmq", "dtype": "uint8", "shape": shape}).encode()
            req.send_multipart([md, bytes(n)])
            daemon.pump(lambda: req.poll(0), what="OK reply")
            assert req.recv() == b"OK"
        daemon.pump(lambda: len(daemon.records()) == 2, what="two records")
    finally:
        daemon.close()
    reasons = [b["reason"] for _, b in daemon.records()]
    assert all("internal error" not in r for r in reasons), reasons
    assert [b["code"] for _, b in daemon.records()] == ["payload", "field"]


# ---- 8. the reason for 0x0 images -------------------------------------------------------------------------


def test_8_zero_size_jpeg_gets_its_own_reason(daemon):
    jpeg = bytearray(_jpeg(16, 16))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = bytes(4)
    daemon.camera.send_multipart([encode_header("cam1", 8, 1, "jpeg"), bytes(jpeg)])
    daemon.pump(lambda: daemon.records(), what="a record")
    ((_, rec),) = daemon.records()
    assert "0x0" in rec["reason"] and "maximum" not in rec["reason"], rec["reason"]
    assert rec["code"] == "frame_size"


# ---- 9. over-size messages --------------------------------------------------------------------------------


def _transport(daemon, socket: str, event: str) -> float:
    key = ("edge_transport_events_total", (("event", event), ("socket", socket)))
    return daemon.counters().get(key, 0)


def test_9_oversize_message_is_counted_at_the_transport(daemon):
    hard = 4 * daemon.cfg.max_frame.nbytes + (1 << 20)
    assert daemon.ingest.hard_limit == hard
    daemon.camera.send_multipart(raw_frame("cam1", 0))
    daemon.pump(lambda: len(daemon.records()) == 1, what="first record")
    before = _transport(daemon, "frames", "disconnected")
    big = daemon.connect()
    big.send_multipart([encode_header("cam1", 1, 1, "jpeg"), bytes(hard + 1)])
    daemon.pump(lambda: _transport(daemon, "frames", "disconnected") == before + 1, what="disconnect counted")
    daemon.camera.send_multipart([encode_header("cam1", 2, 1, "jpeg"), bytes(hard)])  # at the limit: a record
    daemon.pump(lambda: len(daemon.records()) == 2, what="record for the message at the limit")
    assert "over the configured maximum" in daemon.records()[-1][1]["reason"]


def test_9_imagezmq_req_sender_over_the_limit_times_out_as_documented():
    daemon = InProcessDaemon(imagezmq=True)
    try:
        hard = daemon.ingest.hard_limit
        req = daemon.connect(daemon.cfg.endpoints.imagezmq, zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 300)
        req.send_multipart([json.dumps({"msg": "izmq", "jpg_buffer": True}).encode(), bytes(hard + 1)])
        daemon.pump(lambda: _transport(daemon, "imagezmq", "disconnected") == 1, what="disconnect counted")
        with pytest.raises(zmq.Again):  # no reply: the message never reached the daemon
            req.recv()
        fresh = daemon.connect(daemon.cfg.endpoints.imagezmq, zmq.REQ)
        fresh.send_multipart([json.dumps({"msg": "izmq", "jpg_buffer": True}).encode(), _jpeg()])
        daemon.pump(lambda: fresh.poll(0), what="OK for the next sender")
        assert fresh.recv() == b"OK"
    finally:
        daemon.close()


# ---- the real daemon ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["multi", "single"])
def real(request, tmp_path_factory, tiny_bundle):
    pytest.importorskip("onnxruntime")
    tmp = tmp_path_factory.mktemp("hardening")
    path, data = daemon_config(
        tmp, tiny_bundle, queue={"slots": 24, "size": 8, "worker_credit": 8}, process_mode=request.param
    )
    proc = DaemonProcess(path, tmp / "daemon.log", instance=data["instance"])
    try:
        proc.wait_ready(data["endpoints"]["metrics_port"], timeout_s=60)
        yield proc, data
    finally:
        proc.stop()


def _scrape(data) -> dict[str, float]:
    return parse_metrics(scrape(data["endpoints"]["metrics_port"])[1])


def test_daemon_zero_counters_present_at_start(real):
    proc, data = real
    m = _scrape(data)
    for cam in ("cam1", "cam2", "_other", "unknown"):
        for name in ("received", "answered", "failed", "dropped"):
            assert f'edge_frames_{name}_total{{camera="{cam}"}}' in m, (name, cam)
    assert m['edge_protocol_errors_total{reason="version"}'] == 0
    assert m['edge_transport_events_total{event="disconnected",socket="frames"}'] == 0
    assert m['edge_worker_restarts_total{worker="0"}'] == 0


def test_daemon_burst_churn_and_oversize(real):
    """Bursts of 12 and 16 frames into an idle worker: no drops; 70 bad ids: accounting per camera label;
    an over-size message: counted at the transport; the subscriber of cam1 sees no gap."""
    proc, data = real
    ep = data["endpoints"]
    with VerdictSubscriber(ep["output"]) as sub, FramePublisher(ep["ingest"], "cam1", hwm=100) as cam:
        records, probes = handshake(cam, sub, np.zeros((16, 16), np.uint8))
        sent = len(probes)
        for n in (12, 16):
            records += collect(sub, 100, 0.3)
            got_before = len(records)
            for _ in range(n):
                cam.send(np.zeros((16, 16), np.uint8))
            sent += n
            records += collect(sub, sent - got_before, 20.0, until=lambda r, k=sent - got_before: len(r) >= k)
            assert [r.kind for r in records[got_before:]] == ["verdict"] * n
        cam.send_parts(raw_frame("late-cam", 1))
        for i in range(70):
            cam.send_parts(_bad(f"z{i:02d}"))
        sent += 71
        with zmq.Context() as ctx:
            big = ctx.socket(zmq.PUSH)
            big.setsockopt(zmq.LINGER, 0)
            big.connect(ep["ingest"])
            hard_limit = 4 * 256 * 256 * 3 + (1 << 20)
            big.send_multipart([encode_header("cam1", 9, 1, "jpeg"), bytes(hard_limit + 1)])
            key = 'edge_transport_events_total{event="disconnected",socket="frames"}'
            wait_until(
                lambda: _scrape(data).get(key),
                15.0,
                0.2,
                "disconnect counted",
            )
            big.close()
        records += collect(sub, 10**6, 1.0)
        assert sub.missed == 0 and sub.resets == 0

    def settled():
        m = _scrape(data)
        total = sum(v for k, v in m.items() if k.startswith("edge_frames_received_total"))
        return m if total == sent else None

    m = wait_until(settled, 15.0, 0.2, f"{sent} messages received")
    for cam in ("cam1", "cam2", "_other", "unknown"):
        outcomes = sum(m[f'edge_frames_{k}_total{{camera="{cam}"}}'] for k in _KINDS)
        assert m[f'edge_frames_received_total{{camera="{cam}"}}'] == outcomes, cam
    assert m['edge_frames_received_total{camera="_other"}'] == 71
    assert m['edge_protocol_errors_total{reason="version"}'] == 70
    assert sum(v for k, v in m.items() if k.startswith("edge_frames_dropped_total")) == 0
    assert proc.proc.poll() is None


# ---- what docs/protocol.md says about JPEG/PNG variants --------------------------------------------------


def _pil(mode: str, fmt: str, **save) -> bytes:
    import io

    image = pytest.importorskip("PIL.Image")
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 200  # red
    img = image.fromarray(rgb)
    if mode == "LA":
        img = image.fromarray(np.dstack([rgb[..., 0], np.full((6, 8), 9, np.uint8)]), "LA")
    elif mode != "RGB":
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, fmt, **save)
    return out.getvalue()


@pytest.mark.parametrize(
    "name, encoding, payload, shape, dtype",
    [
        ("jpeg colour", "jpeg", lambda: _pil("RGB", "JPEG", quality=95), (6, 8, 3), "uint8"),
        ("jpeg progressive", "jpeg", lambda: _pil("RGB", "JPEG", progressive=True), (6, 8, 3), "uint8"),
        ("jpeg grey", "jpeg", lambda: _pil("L", "JPEG"), (6, 8), "uint8"),
        ("jpeg cmyk", "jpeg", lambda: _pil("CMYK", "JPEG"), (6, 8, 3), "uint8"),
        ("png rgb", "png", lambda: _pil("RGB", "PNG"), (6, 8, 3), "uint8"),
        ("png grey+alpha", "png", lambda: _pil("LA", "PNG"), (6, 8, 3), "uint8"),
        ("png palette", "png", lambda: _pil("P", "PNG"), (6, 8, 3), "uint8"),
        ("png 1-bit", "png", lambda: _pil("1", "PNG"), (6, 8), "uint8"),
        (
            "png rgba16",
            "png",
            lambda: cv2.imencode(".png", np.full((6, 8, 4), 999, np.uint16))[1].tobytes(),
            (6, 8, 3),
            "uint16",
        ),
    ],
)
def test_jpeg_and_png_variants_are_stored_as_documented(name, encoding, payload, shape, dtype):
    from edge_daemon.frames import FrameIn, decode_into
    from edge_daemon.shm import SlotRing

    ring = SlotRing.create(f"v{abs(hash(name)) % 10**8}", 2, 64 * 64 * 3 * 2)
    try:
        buf = payload()
        frame = FrameIn("cam1", 1, 1, 1, encoding, memoryview(buf))
        got_shape, got_dtype = decode_into(frame, ring, 0, 64, 64)
        pixels = ring.view(0, got_shape, got_dtype).copy()
    finally:
        ring.close()
    assert (got_shape, got_dtype) == (shape, dtype), name
    if name in ("png rgb", "png palette", "jpeg colour"):  # colour arrives as RGB: red stays in channel 0
        assert pixels[..., 0].mean() > 150 and pixels[..., 2].mean() < 50, (name, pixels[0, 0])
    if name == "png 1-bit":  # 1-bit scaled to 0/255
        assert set(np.unique(pixels)) <= {0, 255}
