"""Protocol v1: header round trip, every class of bad message raises ProtocolError with a reason."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_daemon.frames import parse_imagezmq, parse_protocol
from edge_daemon.protocol import (
    MAX_HEADER_BYTES,
    ProtocolError,
    check_raw_payload,
    decode_header,
    encode_header,
    make_record,
)


def _good(**over) -> dict:
    base = {
        "v": 1,
        "camera_id": "cam1",
        "frame_id": 3,
        "timestamp_ns": 123,
        "encoding": "mono8",
        "width": 4,
        "height": 2,
        "channels": 1,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def test_round_trip():
    h = decode_header(encode_header("cam1", 7, 99, "bgr8", 640, 480, 3))
    assert (h.camera_id, h.frame_id, h.timestamp_ns, h.encoding, h.width, h.height, h.channels) == (
        "cam1",
        7,
        99,
        "bgr8",
        640,
        480,
        3,
    )
    assert h.expected_payload_bytes() == 640 * 480 * 3
    assert decode_header(encode_header("c", 0, 0, "mono16", 5, 5, 1)).expected_payload_bytes() == 50
    assert decode_header(encode_header("c", 1, 0, "jpeg")).is_raw is False


@pytest.mark.parametrize(
    "header, reason, code",
    [
        (_good(v=2), "unsupported protocol version", "version"),
        (_good(frame_id=...), "misses field(s) frame_id", "field"),
        (_good(camera_id=...), "misses field(s) camera_id", "camera_id"),
        (_good(frame_id="3"), "'frame_id' must be an integer", "field"),
        (_good(frame_id=True), "'frame_id' must be an integer", "field"),
        (_good(frame_id=-1), "frame_id must be in", "field"),
        (_good(timestamp_ns=-1), "timestamp_ns must be in [0, 2^63)", "field"),
        (_good(timestamp_ns=2**63), "timestamp_ns must be in [0, 2^63)", "field"),
        (_good(camera_id=""), "camera_id must be", "camera_id"),
        (_good(camera_id="x" * 65), "camera_id must be", "camera_id"),
        (_good(camera_id="a/b"), "camera_id must be", "camera_id"),
        (_good(camera_id="a b"), "camera_id must be", "camera_id"),
        (_good(camera_id="cam\r"), "camera_id must be", "camera_id"),
        (_good(camera_id="_other"), "camera_id must be", "camera_id"),
        (_good(camera_id="unknown"), "'unknown' is reserved", "camera_id"),
        (_good(camera_id=7), "'camera_id' must be a string", "camera_id"),
        (_good(encoding="yuv422"), "unknown encoding", "encoding"),
        (_good(extra=1), "unexpected header field(s) extra", "field"),
        (_good(width=0), "'width' must be > 0", "field"),
        (_good(height=...), "needs field(s) height", "field"),
        (_good(channels=3), "mono8 has 1 channel(s)", "field"),
        (_good(encoding="jpeg"), "unexpected header field(s)", "field"),
    ],
)
def test_bad_headers(header, reason, code):
    with pytest.raises(ProtocolError) as info:
        decode_header(msgpack.packb(header))
    assert reason in info.value.reason and info.value.code == code
    valid_cam = header.get("camera_id") in ("cam1",)
    assert info.value.camera_id == ("cam1" if valid_cam else "unknown")
    if isinstance(header.get("frame_id"), int) and not isinstance(header["frame_id"], bool):
        assert info.value.frame_id == (header["frame_id"] if header["frame_id"] >= 0 else None)


def test_camera_ids_at_the_limits():
    assert decode_header(encode_header("a" * 64, 1, 0, "jpeg")).camera_id == "a" * 64
    assert decode_header(encode_header("Cam-1.left_2", 1, 0, "jpeg")).camera_id == "Cam-1.left_2"
    assert decode_header(encode_header("c", 2**63 - 1, 2**63 - 1, "jpeg")).frame_id == 2**63 - 1


def test_camera_known_when_readable():
    with pytest.raises(ProtocolError) as info:
        decode_header(msgpack.packb(_good(encoding="nope")))
    assert info.value.camera_id == "cam1" and info.value.frame_id == 3
    with pytest.raises(ProtocolError) as info:
        decode_header(b"\xc1")
    assert info.value.camera_id == "unknown"


def test_size_limits():
    with pytest.raises(ProtocolError, match="limit"):
        decode_header(msgpack.packb(_good(camera_id="a" * (MAX_HEADER_BYTES + 1))))
    with pytest.raises(ProtocolError, match="msgpack map"):
        decode_header(msgpack.packb([1, 2, 3]))
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode_header(msgpack.packb({1: 2}))  # non-string keys refused


def test_payload_length_checked():
    h = decode_header(encode_header("c", 0, 0, "rgb8", 4, 2, 3))
    check_raw_payload(h, 24)
    with pytest.raises(ProtocolError, match="payload is 23 bytes"):
        check_raw_payload(h, 23)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_header_bytes_only_raise_protocol_error(data):
    try:
        decode_header(data)
    except ProtocolError as exc:
        assert exc.reason


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["v", "camera_id", "frame_id", "timestamp_ns", "encoding", "width", "height", "channels", "x"]
        ),
        st.one_of(
            st.integers(-3, 2**64 - 1),
            st.text(max_size=5),
            st.none(),
            st.booleans(),
            st.sampled_from(["mono8", "jpeg", "rgb8"]),
        ),
    )
)
def test_fuzz_header_fields(fields):
    try:
        h = decode_header(msgpack.packb(fields))
    except ProtocolError:
        return
    assert h.frame_id >= 0 and h.camera_id and (not h.is_raw or h.width > 0)


def _frames(*parts):
    return [zmq.Frame(p) for p in parts]


def test_parse_protocol_message():
    frame = parse_protocol(_frames(encode_header("cam", 1, 5, "mono8", 4, 2, 1), bytes(8)), 10, 1000)
    assert frame.shape == (2, 4) and frame.capture_ns == 5 and frame.receive_ns == 10
    with pytest.raises(ProtocolError, match="2 message parts"):
        parse_protocol(_frames(b"a"), 0, 1000)
    with pytest.raises(ProtocolError, match="empty"):
        parse_protocol(_frames(encode_header("cam", 1, 5, "jpeg"), b""), 0, 1000)
    with pytest.raises(ProtocolError, match="over the configured maximum"):
        parse_protocol(_frames(encode_header("cam", 1, 5, "jpeg"), bytes(1001)), 0, 1000)


def test_parse_imagezmq_messages():
    ids = iter(range(100))
    arr = np.zeros((4, 5, 3), np.uint8)
    md = json.dumps({"msg": "cam9", "dtype": "uint8", "shape": [4, 5, 3]}).encode()
    f = parse_imagezmq(_frames(md, arr.tobytes()), 1, 10**6, lambda cam: next(ids))
    assert (f.camera_id, f.frame_id, f.shape, f.encoding) == ("cam9", 0, (4, 5, 3), "imagezmq-raw")
    jpg = parse_imagezmq(
        _frames(b'{"msg": "cam9", "jpg_buffer": true}', b"\xff\xd8"), 1, 10**6, lambda cam: next(ids)
    )
    assert jpg.encoding == "jpeg" and jpg.frame_id == 1
    with pytest.raises(ProtocolError, match="needs"):
        parse_imagezmq(_frames(md, bytes(3)), 1, 10**6, lambda cam: 0)
    with pytest.raises(ProtocolError, match="not JSON"):
        parse_imagezmq(_frames(b"\x00{", b"x"), 1, 10**6, lambda cam: 0)
    with pytest.raises(ProtocolError, match="unsupported dtype"):
        parse_imagezmq(
            _frames(b'{"msg": "c", "dtype": "float64", "shape": [2, 2]}', bytes(32)), 1, 10**6, lambda cam: 0
        )


def test_record_fields():
    rec = make_record("drop", "cam1", 4, reason="queue full", receive_ns=5)
    assert rec["kind"] == "drop" and rec["v"] == 1 and rec["reason"] == "queue full"
    assert msgpack.unpackb(msgpack.packb(rec), raw=False) == rec
    with pytest.raises(ValueError, match="kind"):
        make_record("bogus", "c", 1)
