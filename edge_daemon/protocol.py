"""Wire protocol v1: frame messages in, records out, descriptors between processes (see docs/protocol.md).

Frame message (camera -> ingest): multipart ``[msgpack header, pixel payload]``.
Record (publisher -> subscribers): multipart ``[topic = camera id, msgpack record]``.
Descriptor (ingest -> worker, internal): one msgpack map naming a shared-memory slot.

Everything is msgpack with hard size limits; nothing is ever unpickled or evaluated. Every parse failure
raises ``ProtocolError`` with a reason that goes, unchanged, into the error record.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_HEADER_BYTES",
    "RAW_ENCODINGS",
    "ENCODINGS",
    "UNKNOWN_CAMERA",
    "ProtocolError",
    "FrameHeader",
    "encode_header",
    "decode_header",
    "check_raw_payload",
    "unpack_limited",
    "pack",
    "make_record",
    "RECORD_KINDS",
]

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4096
MAX_CAMERA_ID = 64
UNKNOWN_CAMERA = "unknown"
# encoding -> (channels, numpy dtype) for raw pixel formats
RAW_ENCODINGS = {"mono8": (1, "uint8"), "mono16": (1, "uint16"), "bgr8": (3, "uint8"), "rgb8": (3, "uint8")}
ENCODINGS = (*RAW_ENCODINGS, "jpeg", "png")
RECORD_KINDS = ("verdict", "error", "drop")
_REQUIRED = {"v": int, "camera_id": str, "frame_id": int, "timestamp_ns": int, "encoding": str}
_RAW_FIELDS = {"width": int, "height": int, "channels": int}


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``camera_id`` is set when it could be read."""

    def __init__(self, reason: str, camera_id: str = UNKNOWN_CAMERA, frame_id: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.camera_id = camera_id
        self.frame_id = frame_id


@dataclass(frozen=True)
class FrameHeader:
    camera_id: str
    frame_id: int
    timestamp_ns: int
    encoding: str
    width: int = 0  # raw encodings only
    height: int = 0
    channels: int = 0
    v: int = PROTOCOL_VERSION

    @property
    def is_raw(self) -> bool:
        return self.encoding in RAW_ENCODINGS

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(RAW_ENCODINGS[self.encoding][1]) if self.is_raw else np.dtype("uint8")

    def expected_payload_bytes(self) -> int:
        return self.width * self.height * self.channels * self.dtype.itemsize


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_limited(data, max_bytes: int = MAX_HEADER_BYTES, max_items: int = 64):
    """msgpack-decode a small message with every size limit set (str, bin, array, map, total)."""
    if len(data) > max_bytes:
        raise ProtocolError(f"header is {len(data)} bytes, limit {max_bytes}")
    try:
        return msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_items,
            max_map_len=max_items,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from exc


def _check_type(data: dict, key: str, kind: type, camera_id: str) -> None:
    value = data[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ProtocolError(f"header field '{key}' must be an integer, got {type(value).__name__}", camera_id)
    if kind is str and not isinstance(value, str):
        raise ProtocolError(f"header field '{key}' must be a string, got {type(value).__name__}", camera_id)


def _camera_of(data: dict) -> str:
    cam = data.get("camera_id")
    return cam if isinstance(cam, str) and 0 < len(cam) <= MAX_CAMERA_ID else UNKNOWN_CAMERA


def decode_header(data) -> FrameHeader:
    """Parse and validate a frame header (bytes); raise ProtocolError with the reason."""
    obj = unpack_limited(data)
    if not isinstance(obj, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(obj).__name__}")
    camera_id = _camera_of(obj)
    if "v" in obj and obj["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {obj['v']!r} (this daemon speaks {PROTOCOL_VERSION})", camera_id
        )
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise ProtocolError(f"header misses field(s) {', '.join(missing)}", camera_id)
    for key, kind in _REQUIRED.items():
        _check_type(obj, key, kind, camera_id)
    cam, enc = obj["camera_id"], obj["encoding"]
    if not cam or len(cam) > MAX_CAMERA_ID or not cam.isprintable() or "/" in cam:
        raise ProtocolError(f"camera_id must be 1..{MAX_CAMERA_ID} printable characters without '/'")
    frame_id = obj["frame_id"]
    if frame_id < 0 or frame_id >= 2**63:
        raise ProtocolError(f"frame_id must be in [0, 2^63), got {frame_id}", cam)
    if enc not in ENCODINGS:
        raise ProtocolError(
            f"unknown encoding {enc!r}; expected one of {', '.join(ENCODINGS)}", cam, frame_id
        )
    allowed = set(_REQUIRED) | (set(_RAW_FIELDS) if enc in RAW_ENCODINGS else set())
    extra = sorted(set(obj) - allowed)
    if extra:
        raise ProtocolError(
            f"unexpected header field(s) {', '.join(map(str, extra))} for encoding {enc}", cam, frame_id
        )
    fields = {k: obj[k] for k in _REQUIRED}
    if enc in RAW_ENCODINGS:
        _decode_raw_fields(obj, enc, cam, frame_id, fields)
    return FrameHeader(**fields)


def _decode_raw_fields(obj: dict, enc: str, cam: str, frame_id: int, fields: dict) -> None:
    missing = [k for k in _RAW_FIELDS if k not in obj]
    if missing:
        raise ProtocolError(f"raw encoding {enc} needs field(s) {', '.join(missing)}", cam, frame_id)
    for key, kind in _RAW_FIELDS.items():
        _check_type(obj, key, kind, cam)
        if obj[key] <= 0:
            raise ProtocolError(f"header field '{key}' must be > 0, got {obj[key]}", cam, frame_id)
        fields[key] = obj[key]
    if obj["channels"] != RAW_ENCODINGS[enc][0]:
        raise ProtocolError(
            f"encoding {enc} has {RAW_ENCODINGS[enc][0]} channel(s), header says {obj['channels']}",
            cam,
            frame_id,
        )


def check_raw_payload(header: FrameHeader, nbytes: int) -> None:
    expected = header.expected_payload_bytes()
    if nbytes != expected:
        raise ProtocolError(
            f"payload is {nbytes} bytes, {header.encoding} {header.width}x{header.height} needs {expected}",
            header.camera_id,
            header.frame_id,
        )


def encode_header(
    camera_id: str,
    frame_id: int,
    timestamp_ns: int,
    encoding: str,
    width: int = 0,
    height: int = 0,
    channels: int = 0,
) -> bytes:
    header = {
        "v": PROTOCOL_VERSION,
        "camera_id": camera_id,
        "frame_id": int(frame_id),
        "timestamp_ns": int(timestamp_ns),
        "encoding": encoding,
    }
    if encoding in RAW_ENCODINGS:
        header.update(width=int(width), height=int(height), channels=int(channels))
    return pack(header)


def make_record(
    kind: str,
    camera_id: str,
    frame_id: int | None,
    *,
    capture_ns: int | None = None,
    receive_ns: int | None = None,
    model_id: str = "",
    reason: str = "",
    verdict: str | None = None,
    score: float | None = None,
    threshold: float | None = None,
    regions: list | None = None,
    timings_ms: dict | None = None,
) -> dict:
    """One record of the verdict stream (a plain dict, ready for msgpack)."""
    if kind not in RECORD_KINDS:
        raise ValueError(f"record kind must be one of {RECORD_KINDS}, got {kind!r}")
    return {
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "camera_id": camera_id,
        "frame_id": frame_id,
        "capture_ns": capture_ns,
        "receive_ns": receive_ns,
        "verdict": verdict,
        "score": None if score is None else float(score),
        "threshold": None if threshold is None else float(threshold),
        "regions": regions or [],
        "timings_ms": {k: float(v) for k, v in (timings_ms or {}).items()},
        "model_id": model_id,
        "reason": reason,
    }
