"""Frame messages -> validated ``FrameIn`` -> pixels in a shared-memory slot (pure functions, no sockets).

``parse_protocol`` (protocol v1 ``[msgpack header, payload]``) and ``parse_imagezmq`` (imagezmq's
``[json, payload]``) check everything that can be checked without touching pixels; ``decode_into`` then
decodes JPEG/PNG (after reading the image size from its header, so a small "bomb" claiming a huge image is
refused before anything is allocated) or copies raw pixels, into a slot as mono or RGB at native depth.
Every refusal is a ``ProtocolError`` with its reason class (docs/protocol.md lists them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import cv2
import numpy as np

from .cameras import camera_id_problem
from .protocol import (
    MAX_HEADER_BYTES,
    FrameHeader,
    ProtocolError,
    check_raw_payload,
    decode_header,
    header_ids,
)
from .shm import SlotRing

__all__ = [
    "FrameIn",
    "MAX_JPEG_MARKERS",
    "encoded_size",
    "decode_into",
    "decode_frame",
    "direct_layout",
    "check_payload_size",
    "DIRECT_ENCODINGS",
    "parse_protocol",
    "parse_imagezmq",
]

MAX_JPEG_MARKERS = 1024  # markers read looking for the JPEG frame header (real files: fewer than 30)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the image size
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_TO_RGB = {("bgr", 3): cv2.COLOR_BGR2RGB, ("bgr", 4): cv2.COLOR_BGRA2RGB, ("rgb", 4): cv2.COLOR_RGBA2RGB}
_IMAGEZMQ_DTYPES = ("uint8", "uint16")
DIRECT_ENCODINGS = ("mono8", "mono16", "rgb8")  # raw layouts stored in a slot exactly as they arrive


@dataclass
class FrameIn:
    """A received frame before it has a slot: header fields plus the pixel source."""

    camera_id: str
    frame_id: int
    capture_ns: int
    receive_ns: int
    encoding: str  # protocol encoding, or "imagezmq-raw" / "jpeg" for imagezmq
    payload: memoryview
    shape: tuple[int, ...] = ()  # raw only: h, w[, c]
    dtype: str = "uint8"

    def error(self, reason: str, code: str) -> ProtocolError:
        return ProtocolError(reason, self.camera_id, self.frame_id, code)


# ---- image sizes from headers -----------------------------------------------------------------------------


def _jpeg_size(buf: memoryview) -> tuple[int, int] | None:
    """(width, height) from the first SOF marker, walking segment lengths (no pixel data is read); None when
    the stream is not a JPEG or no SOF comes within MAX_JPEG_MARKERS markers."""
    if bytes(buf[:2]) != b"\xff\xd8":
        return None
    i, n = 2, len(buf)
    for _ in range(MAX_JPEG_MARKERS):
        if i + 4 > n or buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers
            i += 2
            continue
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            return int.from_bytes(buf[i + 7 : i + 9], "big"), int.from_bytes(buf[i + 5 : i + 7], "big")
        length = int.from_bytes(buf[i + 2 : i + 4], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


def encoded_size(payload, encoding: str) -> tuple[int, int] | None:
    """(width, height) read from a PNG IHDR or a JPEG SOF header without decoding; None if unreadable."""
    buf = memoryview(payload).cast("B")
    if encoding == "png":
        head = bytes(buf[:24])
        if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
            return None
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return _jpeg_size(buf)


# ---- pixels into a slot -----------------------------------------------------------------------------------


def _imdecode(frame: FrameIn, max_w: int, max_h: int) -> np.ndarray:
    def refuse(problem: str, code: str) -> ProtocolError:
        return frame.error(f"{frame.encoding} payload of {len(frame.payload)} bytes {problem}", code)

    size = encoded_size(frame.payload, frame.encoding)
    if size is None:
        raise refuse("could not be decoded: no readable image header (truncated or corrupt)", "image")
    if 0 in size:
        raise refuse(f"claims {size[0]}x{size[1]} pixels: width and height must be > 0", "frame_size")
    if size[0] > max_w or size[1] > max_h:
        raise refuse(f"claims {size[0]}x{size[1]}, over the configured maximum {max_w}x{max_h}", "frame_size")
    try:
        img = cv2.imdecode(np.frombuffer(frame.payload, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise refuse(
            f"could not be decoded (OpenCV: {str(exc).strip().splitlines()[-1][:200]})", "image"
        ) from exc
    if img is None or img.size == 0:
        raise refuse("could not be decoded (truncated or corrupt)", "image")
    if img.dtype not in (np.uint8, np.uint16) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        raise refuse(f"decodes to an unsupported {img.dtype} image of shape {img.shape}", "image")
    return img


def _slot_shape(img: np.ndarray) -> tuple[int, ...]:
    """Frames are stored mono (H, W) or RGB (H, W, 3), uint8 or uint16; the pipeline converts the rest."""
    channels = 1 if img.ndim == 2 else img.shape[2]
    return img.shape[:2] if channels == 1 else (*img.shape[:2], 3)


def _pixels(frame: FrameIn, max_w: int, max_h: int, max_bytes: int) -> tuple[np.ndarray, int | None]:
    """The frame's pixels as an array (a view of the payload for raw frames, the decoded image otherwise)
    and the cv2 colour conversion still due to store it mono or RGB (None: stored as it is)."""
    if frame.encoding in ("jpeg", "png"):
        img = _imdecode(frame, max_w, max_h)
        color = "bgr"
    else:
        img = np.frombuffer(frame.payload, dtype=frame.dtype).reshape(frame.shape)
        color = "rgb" if frame.encoding == "rgb8" else "bgr"
    h, w = img.shape[:2]
    if w > max_w or h > max_h:
        raise frame.error(f"frame {w}x{h} exceeds the configured maximum {max_w}x{max_h}", "frame_size")
    shape = _slot_shape(img)
    if math.prod(shape) * img.dtype.itemsize > max_bytes:
        raise frame.error(
            f"frame {shape} {img.dtype} exceeds the configured maximum frame size ({max_bytes} bytes)",
            "frame_size",
        )
    channels = 1 if img.ndim == 2 else img.shape[2]
    return img, _TO_RGB.get((color, channels))


def decode_into(
    frame: FrameIn, ring: SlotRing, slot: int, max_w: int, max_h: int
) -> tuple[tuple[int, ...], str]:
    """Decode/copy ``frame`` into ``slot`` (mono or RGB, native depth); return the slot view's (shape, dtype).

    Raw payloads are copied once (from the zmq buffer); JPEG/PNG are decoded then copied."""
    img, code = _pixels(frame, max_w, max_h, ring.slot_bytes)
    shape = _slot_shape(img)
    out = ring.view(slot, shape, img.dtype)
    if code is None:
        np.copyto(out, img.reshape(shape))
    else:
        res = cv2.cvtColor(img, code, dst=out)
        if not np.shares_memory(res, out):
            np.copyto(out, res)
    return shape, img.dtype.name


def decode_frame(frame: FrameIn, max_w: int, max_h: int, max_bytes: int) -> np.ndarray:
    """The frame as a slot would hold it (mono H x W or RGB H x W x 3, native depth), copied only where a
    conversion is due: a raw mono or rgb8 frame is a view of the received message itself (which it keeps
    alive; nothing downstream writes to it); bgr8 and alpha are converted, JPEG/PNG decoded. Used by the
    single-process mode."""
    img, code = _pixels(frame, max_w, max_h, max_bytes)
    if code is not None:
        return cv2.cvtColor(img, code)
    return img.reshape(_slot_shape(img))


# ---- messages -> FrameIn ----------------------------------------------------------------------------------


def check_payload_size(nbytes: int, max_bytes: int, cam: str, fid, prefix: str = "") -> None:
    if nbytes == 0:
        raise ProtocolError(f"{prefix}payload is empty", cam, fid, "payload")
    if nbytes > max_bytes:
        raise ProtocolError(
            f"{prefix}payload is {nbytes} bytes, over the configured maximum {max_bytes}",
            cam,
            fid,
            "payload",
        )


def _check_payload(payload, max_bytes: int, cam: str, fid, prefix: str = "") -> None:
    check_payload_size(len(payload), max_bytes, cam, fid, prefix)


def direct_layout(
    header: FrameHeader, max_w: int, max_h: int, max_bytes: int
) -> tuple[tuple[int, ...], int] | None:
    """(slot shape, payload bytes) of a raw frame a slot stores exactly as it arrives (mono8, mono16, rgb8
    within max_frame), so that its payload can be received straight into the slot; None otherwise (other
    encodings, a frame refused anyway: those take the ordinary path and its error record)."""
    if header.encoding not in DIRECT_ENCODINGS or header.width > max_w or header.height > max_h:
        return None
    nbytes = header.expected_payload_bytes()
    if not 0 < nbytes <= max_bytes:
        return None
    shape = (header.height, header.width) + ((3,) if header.channels == 3 else ())
    return shape, nbytes


def parse_protocol(parts: list, receive_ns: int, max_bytes: int) -> FrameIn:
    """A protocol v1 message [header, payload] -> FrameIn (validated), or ProtocolError."""
    if len(parts) != 2:
        cam, fid = header_ids(parts[0].buffer)
        raise ProtocolError(
            f"expected 2 message parts [header, payload], got {len(parts)}", cam, fid, "parts"
        )
    header = decode_header(parts[0].buffer)
    payload = parts[1].buffer
    cam, fid = header.camera_id, header.frame_id
    _check_payload(payload, max_bytes, cam, fid)
    shape: tuple[int, ...] = ()
    if header.is_raw:
        check_raw_payload(header, len(payload))
        shape = (header.height, header.width) + ((header.channels,) if header.channels > 1 else ())
    return FrameIn(
        cam, fid, header.timestamp_ns, receive_ns, header.encoding, payload, shape, header.dtype.name
    )


def _imagezmq_header(raw: bytes) -> dict:
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"imagezmq: header is {len(raw)} bytes, limit {MAX_HEADER_BYTES}", code="header")
    try:
        md = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"imagezmq: header is not JSON: {exc}"[:300], code="header") from exc
    if not isinstance(md, dict):
        raise ProtocolError("imagezmq: header must be a JSON object", code="header")
    problem = camera_id_problem(md.get("msg"))
    if problem:
        raise ProtocolError(f"imagezmq: 'msg' is the camera id: {problem}", code="camera_id")
    return md


def _imagezmq_shape(shape, dtype, nbytes: int, cam: str, fid: int) -> tuple[int, ...]:
    """Validated array shape: 2 or 3 positive integers (not booleans), 1/3/4 channels, and exactly as many
    bytes as the payload has (Python integers: no overflow however large the claim)."""
    ok = (
        isinstance(shape, list)
        and len(shape) in (2, 3)
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
        and (len(shape) == 2 or shape[2] in (1, 3, 4))
    )
    if not ok:
        raise ProtocolError(f"imagezmq: unsupported array shape {str(shape)[:80]}", cam, fid, "field")
    if dtype not in _IMAGEZMQ_DTYPES:
        raise ProtocolError(
            f"imagezmq: unsupported dtype {str(dtype)[:40]!r} (uint8, uint16)", cam, fid, "encoding"
        )
    needed = math.prod(shape) * np.dtype(dtype).itemsize
    if needed != nbytes:
        raise ProtocolError(
            f"imagezmq: payload is {nbytes} bytes, shape {shape} {dtype} needs {needed}", cam, fid, "payload"
        )
    return tuple(shape)


def parse_imagezmq(parts: list, receive_ns: int, max_bytes: int, next_id) -> FrameIn:
    """imagezmq's [json {"msg", "dtype", "shape"} | {"msg"[, "jpg_buffer"]}, payload] -> FrameIn.

    ``next_id(camera_id)`` numbers the frames of each camera (imagezmq has no frame ids)."""
    if len(parts) != 2:
        raise ProtocolError(f"imagezmq: expected 2 message parts, got {len(parts)}", code="parts")
    md = _imagezmq_header(parts[0].bytes)
    cam = md["msg"]
    fid = next_id(cam)
    payload = parts[1].buffer
    _check_payload(payload, max_bytes, cam, fid, "imagezmq: ")
    if "shape" not in md and "dtype" not in md:
        return FrameIn(cam, fid, receive_ns, receive_ns, "jpeg", payload)
    shape = _imagezmq_shape(md.get("shape"), md.get("dtype"), len(payload), cam, fid)
    return FrameIn(cam, fid, receive_ns, receive_ns, "imagezmq-raw", payload, shape, md["dtype"])
