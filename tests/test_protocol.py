"""Protocol v1: header round trip, every class of bad message raises ProtocolError with a reason."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_daemon.ingest import parse_imagezmq, parse_protocol
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
    "header, reason",
    [
        (_good(v=2), "unsupported protocol version"),
        (_good(frame_id=...), "misses field(s) frame_id"),
        (_good(frame_id="3"), "'frame_id' must be an integer"),
        (_good(frame_id=True), "'frame_id' must be an integer"),
        (_good(frame_id=-1), "frame_id must be in"),
        (_good(camera_id=""), "camera_id must be"),
        (_good(camera_id="x" * 65), "camera_id must be"),
        (_good(camera_id="a/b"), "camera_id must be"),
        (_good(encoding="yuv422"), "unknown encoding"),
        (_good(extra=1), "unexpected header field(s) extra"),
        (_good(width=0), "'width' must be > 0"),
        (_good(height=...), "needs field(s) height"),
        (_good(channels=3), "mono8 has 1 channel(s)"),
        (_good(encoding="jpeg"), "unexpected header field(s)"),
    ],
)
def test_bad_headers(header, reason):
    with pytest.raises(ProtocolError) as info:
        decode_header(msgpack.packb(header))
    assert reason in info.value.reason


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
    with pytest.raises(ProtocolError, match="unsupported array"):
        parse_imagezmq(
            _frames(b'{"msg": "c", "dtype": "float64", "shape": [2, 2]}', bytes(32)), 1, 10**6, lambda cam: 0
        )


def test_record_fields():
    rec = make_record("drop", "cam1", 4, reason="queue full", receive_ns=5)
    assert rec["kind"] == "drop" and rec["v"] == 1 and rec["reason"] == "queue full"
    assert msgpack.unpackb(msgpack.packb(rec), raw=False) == rec
    with pytest.raises(ValueError, match="kind"):
        make_record("bogus", "c", 1)
