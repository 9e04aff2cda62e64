"""Client library against plain sockets: frames on the wire, verdict topics, timeouts, CURVE allow-list."""

from __future__ import annotations

import time

import cv2
import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth

from edge_daemon.client import CurveClientKeys, FramePublisher, VerdictSubscriber
from edge_daemon.protocol import decode_header, make_record
from edge_daemon.transport import CurveServer


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def pull(ctx):
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close()


def test_frames_on_the_wire(pull):
    sock, endpoint = pull
    mono = np.arange(12, dtype=np.uint8).reshape(3, 4)
    color = np.zeros((8, 8, 3), np.uint8)
    color[..., 2] = 200
    with FramePublisher(endpoint, "cam1") as pub:
        assert pub.send(mono, timestamp_ns=42) == 0
        assert pub.send(mono.astype(np.uint16) * 300, frame_id=9) == 9
        pub.send(color, encoding="png")
        pub.send(color, encoding="jpeg")
        with pytest.raises(ValueError, match="cannot send"):
            pub.send(np.zeros((2, 2), np.float32))
    header, payload = sock.recv_multipart()
    h = decode_header(header)
    assert (h.encoding, h.width, h.height, h.frame_id, h.timestamp_ns) == ("mono8", 4, 3, 0, 42)
    assert np.array_equal(np.frombuffer(payload, np.uint8).reshape(3, 4), mono)
    header, payload = sock.recv_multipart()
    assert decode_header(header).encoding == "mono16" and len(payload) == 24
    header, payload = sock.recv_multipart()
    assert decode_header(header).encoding == "png" and decode_header(header).frame_id == 1
    assert np.array_equal(cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED), color)
    header, payload = sock.recv_multipart()
    assert decode_header(header).encoding == "jpeg" and payload[:2] == b"\xff\xd8"


def test_send_times_out_without_daemon():
    with FramePublisher("tcp://127.0.0.1:1", "cam1", send_timeout_s=0.05, hwm=1) as pub:
        with pytest.raises(TimeoutError):
            for _ in range(10):
                pub.send(np.zeros((2, 2), np.uint8))


def _publish_until(pub_sock, sub: VerdictSubscriber, topic: bytes, record: dict, timeout_s: float = 5.0):
    """Publish until the subscriber receives something (subscription handshake without sleep)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pub_sock.send_multipart([topic, msgpack.packb(record)])
        got = sub.recv(0.05)
        if got is not None:
            return got
    return None


def test_subscriber_filters_exact_camera(ctx):
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        with VerdictSubscriber(f"tcp://127.0.0.1:{port}", cameras=["cam1"], context=ctx) as sub:
            rec = make_record("verdict", "cam1", 1, verdict="PASS", score=0.1, threshold=0.5)
            got = _publish_until(pub, sub, b"cam1", rec)
            assert got is not None and got.ok and got.camera_id == "cam1"
            while sub.recv(0.05) is not None:  # flush the handshake duplicates
                pass
            pub.send_multipart([b"cam10", msgpack.packb(make_record("verdict", "cam10", 1))])
            pub.send_multipart(
                [
                    b"cam1/map",
                    msgpack.packb({"frame_id": 1, "shape": [1], "dtype": "float32", "data": b"\0\0\0\0"}),
                ]
            )
            pub.send_multipart([b"cam1", msgpack.packb(make_record("error", "cam1", 2, reason="bad"))])
            got = sub.recv(2.0)
            assert got.kind == "error" and got.frame_id == 2 and got.reason == "bad" and not got.ok
            assert sub.recv(0.1) is None
    finally:
        pub.close()


def test_recv_timeout_returns_none():
    with VerdictSubscriber("tcp://127.0.0.1:1") as sub:
        start = time.monotonic()
        assert sub.recv(0.1) is None
        assert time.monotonic() - start < 1.0


def test_curve_allow_list(tmp_path, ctx):
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    zmq.auth.create_certificates(str(keys), "server")
    zmq.auth.create_certificates(str(keys), "good")
    zmq.auth.create_certificates(str(keys), "bad")
    (allowed / "good.key").write_text((keys / "good.key").read_text())
    server = CurveServer(ctx, str(keys / "server.key_secret"), str(allowed))
    sock = server.secure(ctx.socket(zmq.PULL))
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        bad = CurveClientKeys(str(keys / "bad.key_secret"), str(keys / "server.key"))
        with FramePublisher(endpoint, "intruder", curve=bad, send_timeout_s=0.2) as pub:
            try:
                pub.send(np.zeros((2, 2), np.uint8))
            except TimeoutError:
                pass  # never connected: nothing gets in either way
            assert not sock.poll(500)
        good = CurveClientKeys(str(keys / "good.key_secret"), str(keys / "server.key"))
        with FramePublisher(endpoint, "cam1", curve=good, send_timeout_s=5.0) as pub:
            pub.send(np.zeros((2, 2), np.uint8))
            assert sock.poll(5000)
            header, _ = sock.recv_multipart()
            assert decode_header(header).camera_id == "cam1"
    finally:
        sock.close()
        server.stop()


def test_publisher_refuses_an_invalid_camera_id():
    for bad in ("cam1/map", "a b", "unknown", "x" * 65):
        with pytest.raises(ValueError, match="camera_id"):
            FramePublisher("tcp://127.0.0.1:1", bad)


def _record(cam: str, seq: int, epoch: int, fid: int = 0) -> bytes:
    return msgpack.packb({**make_record("verdict", cam, fid, verdict="PASS"), "seq": seq, "seq_epoch": epoch})


def test_subscriber_skips_malformed_output_and_counts_gaps_and_resets(ctx):
    """Nothing the output carries makes recv raise: malformed records and maps are skipped and counted.
    A seq jump counts as missed; a new seq_epoch as a reset (plus the new numbering's first seq records)."""
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        with VerdictSubscriber(f"tcp://127.0.0.1:{port}", ["cam1"], maps=True, context=ctx) as sub:
            got = _publish_until(pub, sub, b"cam1", msgpack.unpackb(_record("cam1", 0, 7)))
            assert got is not None and got.seq == 0
            while sub.recv(0.05) is not None:
                pass
            bad = [
                [b"cam1/map", msgpack.packb({"v": 1})],  # a record-like body on a map topic
                [
                    b"cam1/map",
                    msgpack.packb({"frame_id": 1, "shape": [2, 2], "dtype": "float32", "data": b"x"}),
                ],
                [b"cam1", b"\xc1"],  # not msgpack
                [b"cam1", msgpack.packb([1, 2])],
                [b"cam1", msgpack.packb({"kind": "verdict"})],  # fields missing
                [b"cam1", _record("cam2", 0, 7)],  # camera_id is not the topic
                [b"cam1", _record("cam1", 1, 7), b"third part"],
            ]
            for parts in bad:
                pub.send_multipart(parts)
            for seq, epoch in ((1, 7), (2, 7), (5, 7), (3, 9), (4, 9)):  # a gap of 2; a reset, 3 missed
                pub.send_multipart([b"cam1", _record("cam1", seq, epoch)])
            good = {"v": 1, "camera_id": "cam1", "frame_id": 4, "seq": 4, "shape": [1, 2], "dtype": "float32"}
            pub.send_multipart([b"cam1/map", msgpack.packb({**good, "data": b"\0\0\x80?\0\0\0@"})])
            items = [sub.recv(1.0) for _ in range(6)]
            assert [i.seq for i in items[:5]] == [1, 2, 5, 3, 4]
            assert items[5].map.tolist() == [[1.0, 2.0]] and items[5].seq == 4
            assert sub.malformed == len(bad)
            assert (sub.missed, sub.resets) == (2 + 3, 1) and sub.resets_by_camera == {"cam1": 1}
    finally:
        pub.close()
