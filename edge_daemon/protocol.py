"""Wire protocol v1: frame messages in, records out, descriptors between processes (see docs/protocol.md).

Frame message (camera -> ingest): multipart ``[msgpack header, pixel payload]``.
Record (publisher -> subscribers): multipart ``[topic = camera id or "unknown", msgpack record]``.
Descriptor (ingest -> worker, internal): one msgpack map naming a shared-memory slot.

Everything is msgpack with hard size limits; nothing is ever unpickled or evaluated. Every parse failure
raises ``ProtocolError`` with a reason that goes, unchanged, into the error record, a reason class
(``code``: the record's ``code`` field and the ``reason`` label of ``edge_protocol_errors_total``), and the
camera id and frame id whenever the header let them be read (camera ids: cameras.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from .cameras import MAX_CAMERA_ID, UNKNOWN_CAMERA, camera_id_problem, camera_or_unknown

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_HEADER_BYTES",
    "MAX_CAMERA_ID",
    "RAW_ENCODINGS",
    "ENCODINGS",
    "UNKNOWN_CAMERA",
    "PROTOCOL_ERROR_CODES",
    "RECORD_CODES",
    "ProtocolError",
    "FrameHeader",
    "encode_header",
    "decode_header",
    "header_ids",
    "check_raw_payload",
    "unpack_limited",
    "pack",
    "make_record",
    "RECORD_KINDS",
]

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4096
MAX_INT64 = 2**63  # frame_id and timestamp_ns are in [0, 2^63)
# encoding -> (channels, numpy dtype) for raw pixel formats
RAW_ENCODINGS = {"mono8": (1, "uint8"), "mono16": (1, "uint16"), "bgr8": (3, "uint8"), "rgb8": (3, "uint8")}
ENCODINGS = (*RAW_ENCODINGS, "jpeg", "png")
RECORD_KINDS = ("verdict", "error", "drop")
# reason classes of messages ingest refuses (record field ``code``, label of edge_protocol_errors_total)
PROTOCOL_ERROR_CODES = {
    "parts": "not exactly 2 message parts",
    "header": "header not msgpack (JSON for imagezmq), not a map, or over 4096 bytes",
    "version": "protocol version other than 1",
    "camera_id": "camera id missing or invalid",
    "field": "a header field missing, unexpected, of the wrong type or out of range",
    "encoding": "unknown encoding (imagezmq: unsupported dtype)",
    "payload": "payload empty, not the length the header implies, or over the maximum",
    "image": "JPEG/PNG payload that does not decode",
    "frame_size": "frame larger than max_frame, or 0 pixels wide or high",
    "internal": "a daemon bug while parsing or decoding (logged at ERROR)",
}
# ``code`` of records not made from a refused message
RECORD_CODES = {
    "processing": "error: the pipeline refused the frame or the engine failed",
    "worker_lost": "error: the worker process died with the frame",
    "shutdown": "error: not processed before the shutdown timeout",
    "queue_full": "drop: the waiting queue was full (drop policy)",
    "no_slot": "drop: no free shared-memory slot",
}
_REQUIRED = {"v": int, "camera_id": str, "frame_id": int, "timestamp_ns": int, "encoding": str}
_RAW_FIELDS = {"width": int, "height": int, "channels": int}


class ProtocolError(ValueError):
    """A message that does not follow the protocol. ``camera_id`` (validated, else ``unknown``) and
    ``frame_id`` are set whenever the header let them be read; ``code`` is the reason class."""

    def __init__(
        self, reason: str, camera_id: str = UNKNOWN_CAMERA, frame_id: int | None = None, code: str = "field"
    ):
        super().__init__(reason)
        if code not in PROTOCOL_ERROR_CODES:
            raise ValueError(f"unknown protocol error code {code!r}")
        self.reason = reason
        self.camera_id = camera_or_unknown(camera_id)
        self.frame_id = frame_id
        self.code = code


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
        raise ProtocolError(f"header is {len(data)} bytes, limit {max_bytes}", code="header")
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
        reason = f"header is not valid msgpack: {type(exc).__name__}: {exc}"
        raise ProtocolError(reason, code="header") from exc


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ids_of(obj: dict) -> tuple[str, int | None]:
    """(camera id or ``unknown``, frame id or None) as far as a header map lets them be read."""
    fid = obj.get("frame_id")
    return camera_or_unknown(obj.get("camera_id")), fid if _is_int(fid) and 0 <= fid < MAX_INT64 else None


def header_ids(data) -> tuple[str, int | None]:
    """Best effort for messages refused before their header is decoded (wrong part count)."""
    try:
        obj = unpack_limited(data)
    except ProtocolError:
        return UNKNOWN_CAMERA, None
    return _ids_of(obj) if isinstance(obj, dict) else (UNKNOWN_CAMERA, None)


def decode_header(data) -> FrameHeader:
    """Parse and validate a frame header (bytes); raise ProtocolError with the reason.

    Checked in this order, the first problem is reported: msgpack map, version, missing fields, field types,
    camera id, frame id and timestamp ranges, encoding, unexpected fields, raw geometry."""
    obj = unpack_limited(data)
    if not isinstance(obj, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(obj).__name__}", code="header")
    cam, fid = _ids_of(obj)

    def fail(reason: str, code: str = "field") -> ProtocolError:
        return ProtocolError(reason, cam, fid, code)

    if "v" in obj and obj["v"] != PROTOCOL_VERSION:
        version = repr(obj["v"])
        raise fail(
            f"unsupported protocol version {version} (this daemon speaks {PROTOCOL_VERSION})", "version"
        )
    _check_required(obj, fail)
    enc = obj["encoding"]
    if enc not in ENCODINGS:
        raise fail(f"unknown encoding {enc!r}; expected one of {', '.join(ENCODINGS)}", "encoding")
    allowed = set(_REQUIRED) | (set(_RAW_FIELDS) if enc in RAW_ENCODINGS else set())
    extra = sorted(map(str, set(obj) - allowed))
    if extra:
        raise fail(f"unexpected header field(s) {', '.join(extra)} for encoding {enc}")
    fields = {k: obj[k] for k in _REQUIRED}
    if enc in RAW_ENCODINGS:
        fields.update(_raw_fields(obj, enc, fail))
    return FrameHeader(**fields)


def _check_required(obj: dict, fail) -> None:
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        code = "camera_id" if "camera_id" in missing else "field"
        raise fail(f"header misses field(s) {', '.join(missing)}", code)
    for key, kind in _REQUIRED.items():
        value = obj[key]
        if (kind is int and not _is_int(value)) or (kind is str and not isinstance(value, str)):
            what = "an integer" if kind is int else "a string"
            code = "camera_id" if key == "camera_id" else "field"
            raise fail(f"header field '{key}' must be {what}, got {type(value).__name__}", code)
    problem = camera_id_problem(obj["camera_id"])
    if problem:
        raise fail(problem, "camera_id")
    for key in ("frame_id", "timestamp_ns"):
        if not 0 <= obj[key] < MAX_INT64:
            raise fail(f"{key} must be in [0, 2^63), got {obj[key]}")


def _raw_fields(obj: dict, enc: str, fail) -> dict:
    missing = [k for k in _RAW_FIELDS if k not in obj]
    if missing:
        raise fail(f"raw encoding {enc} needs field(s) {', '.join(missing)}")
    for key in _RAW_FIELDS:
        if not _is_int(obj[key]):
            raise fail(f"header field '{key}' must be an integer, got {type(obj[key]).__name__}")
        if obj[key] <= 0:
            raise fail(f"header field '{key}' must be > 0, got {obj[key]}")
    if obj["channels"] != RAW_ENCODINGS[enc][0]:
        raise fail(f"encoding {enc} has {RAW_ENCODINGS[enc][0]} channel(s), header says {obj['channels']}")
    return {k: obj[k] for k in _RAW_FIELDS}


def check_raw_payload(header: FrameHeader, nbytes: int) -> None:
    expected = header.expected_payload_bytes()
    if nbytes != expected:
        raise ProtocolError(
            f"payload is {nbytes} bytes, {header.encoding} {header.width}x{header.height} needs {expected}",
            header.camera_id,
            header.frame_id,
            "payload",
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
    code: str | None = None,
    verdict: str | None = None,
    score: float | None = None,
    threshold: float | None = None,
    regions: list | None = None,
    timings_ms: dict | None = None,
) -> dict:
    """One record of the verdict stream (a plain dict, ready for msgpack).

    ``code``: the reason class (PROTOCOL_ERROR_CODES, RECORD_CODES); "" for verdicts; an error record made
    without one (the worker's) is "processing"."""
    if kind not in RECORD_KINDS:
        raise ValueError(f"record kind must be one of {RECORD_KINDS}, got {kind!r}")
    if code is None:
        code = "processing" if kind == "error" else ""
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
        "reason": " ".join(str(reason).splitlines()),  # one line, whatever an exception message holds
        "code": code,
    }
