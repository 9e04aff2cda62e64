"""Ingest process: camera messages -> validated frames in shared-memory slots -> descriptors to workers.

Sockets
  frames    PULL bind (default) or SUB connect on ``endpoints.ingest``: protocol v1 [msgpack header, payload]
  imagezmq  optional REP bind (answers b'OK' to every message) or SUB connect: imagezmq's [json, payload]
  ctl       PULL bind ipc ``ingest.ipc``: worker hello/done (credits, released slots), supervisor commands
  work-<i>  PUSH bind ipc per worker: descriptors, only while that worker has credit
  records   PUSH connect to the publisher: error and drop records made here
  stats     PUSH connect to the supervisor: metric snapshots, ``drained`` at the end

Ingest alone owns the slot free list and the bounded queue of frames waiting for a worker; when the queue
is full the drop policy picks which frame gets a drop record. Every message that arrives gets exactly one
record, from here (error, drop, worker lost, shutdown) or from a worker (verdict, error).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np
import zmq

from .config import DaemonConfig
from .logs import get_logger, log
from .metrics import CameraLabels, Metrics
from .protocol import (
    MAX_CAMERA_ID,
    MAX_HEADER_BYTES,
    FrameHeader,
    ProtocolError,
    check_raw_payload,
    decode_header,
    make_record,
)
from .shm import FreeList, SlotRing
from .transport import CurveServer, close_socket, ipc_endpoint, make_socket, recv_msg, send_msg

__all__ = [
    "Ingest",
    "FrameIn",
    "decode_into",
    "encoded_size",
    "parse_protocol",
    "parse_imagezmq",
    "run_ingest",
]

_TO_RGB = {("bgr", 3): cv2.COLOR_BGR2RGB, ("bgr", 4): cv2.COLOR_BGRA2RGB, ("rgb", 4): cv2.COLOR_RGBA2RGB}


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


def _slot_shape(img: np.ndarray) -> tuple[int, ...]:
    """Frames are stored mono (H, W) or RGB (H, W, 3), uint8 or uint16; the pipeline converts the rest."""
    channels = 1 if img.ndim == 2 else img.shape[2]
    return img.shape[:2] if channels == 1 else (*img.shape[:2], 3)


def _copy_to_slot(img: np.ndarray, color: str, out: np.ndarray) -> None:
    channels = 1 if img.ndim == 2 else img.shape[2]
    code = _TO_RGB.get((color, channels))
    if code is None:
        np.copyto(out, img.reshape(out.shape))
        return
    res = cv2.cvtColor(img, code, dst=out)
    if not np.shares_memory(res, out):
        np.copyto(out, res)


MAX_IMAGEZMQ_CAMERAS = 1024
STOP_DRAIN_LIMIT = 4096  # messages taken from the external sockets' buffers when a stop arrives
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the image size
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(buf: bytes) -> tuple[int, int] | None:
    if buf[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(buf):
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers
            i += 2
            continue
        length = int.from_bytes(buf[i + 2 : i + 4], "big")
        if marker in _JPEG_SOF and i + 9 <= len(buf):
            return int.from_bytes(buf[i + 7 : i + 9], "big"), int.from_bytes(buf[i + 5 : i + 7], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


def encoded_size(payload, encoding: str) -> tuple[int, int] | None:
    """(width, height) read from a PNG IHDR or a JPEG SOF header without decoding; None if unreadable.

    Checked before ``cv2.imdecode`` so that a small compressed "bomb" claiming a huge image is refused
    before any pixel memory is allocated."""
    buf = bytes(payload[:65536])
    if encoding == "png":
        if buf[:8] != _PNG_SIGNATURE or buf[12:16] != b"IHDR" or len(buf) < 24:
            return None
        return int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big")
    return _jpeg_size(buf)


def _imdecode(frame: FrameIn, max_w: int, max_h: int) -> np.ndarray:
    def refuse(problem: str) -> ProtocolError:
        return ProtocolError(
            f"{frame.encoding} payload of {len(frame.payload)} bytes {problem}",
            frame.camera_id,
            frame.frame_id,
        )

    size = encoded_size(frame.payload, frame.encoding)
    if size is None:
        raise refuse("could not be decoded: no readable image header (truncated or corrupt)")
    if size[0] > max_w or size[1] > max_h or 0 in size:
        raise refuse(f"claims {size[0]}x{size[1]}, over the configured maximum {max_w}x{max_h}")
    try:
        img = cv2.imdecode(np.frombuffer(frame.payload, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise refuse(f"could not be decoded (OpenCV: {str(exc).strip().splitlines()[-1][:200]})") from exc
    if img is None or img.size == 0:
        raise refuse("could not be decoded (truncated or corrupt)")
    if img.dtype not in (np.uint8, np.uint16) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        raise refuse(f"decodes to an unsupported {img.dtype} image of shape {img.shape}")
    return img


def decode_into(
    frame: FrameIn, ring: SlotRing, slot: int, max_w: int, max_h: int
) -> tuple[tuple[int, ...], str]:
    """Decode/copy ``frame`` into ``slot`` (mono or RGB, native depth); return the slot view's (shape, dtype).

    Raw payloads are copied once (from the zmq buffer); JPEG/PNG are decoded then copied."""
    if frame.encoding in ("jpeg", "png"):
        img = _imdecode(frame, max_w, max_h)
        color = "bgr"
    else:
        img = np.frombuffer(frame.payload, dtype=frame.dtype).reshape(frame.shape)
        color = "rgb" if frame.encoding == "rgb8" else "bgr"
    h, w = img.shape[:2]
    if w > max_w or h > max_h:
        raise ProtocolError(
            f"frame {w}x{h} exceeds the configured maximum {max_w}x{max_h}", frame.camera_id, frame.frame_id
        )
    shape = _slot_shape(img)
    if int(np.prod(shape)) * img.dtype.itemsize > ring.slot_bytes:
        raise ProtocolError(
            f"frame {shape} {img.dtype} exceeds the configured maximum frame size ({ring.slot_bytes} bytes)",
            frame.camera_id,
            frame.frame_id,
        )
    _copy_to_slot(img, color, ring.view(slot, shape, img.dtype))
    return shape, img.dtype.name


def parse_protocol(parts: list, receive_ns: int, max_bytes: int) -> FrameIn:
    """A protocol v1 message [header, payload] -> FrameIn (validated), or ProtocolError."""
    if len(parts) != 2:
        raise ProtocolError(f"expected 2 message parts [header, payload], got {len(parts)}")
    header: FrameHeader = decode_header(parts[0].buffer)
    payload = parts[1].buffer
    cam, fid = header.camera_id, header.frame_id
    if len(payload) == 0:
        raise ProtocolError("payload is empty", cam, fid)
    if len(payload) > max_bytes:
        raise ProtocolError(
            f"payload is {len(payload)} bytes, over the configured maximum {max_bytes}", cam, fid
        )
    shape: tuple[int, ...] = ()
    if header.is_raw:
        check_raw_payload(header, len(payload))
        shape = (header.height, header.width) + ((header.channels,) if header.channels > 1 else ())
    return FrameIn(
        cam, fid, header.timestamp_ns, receive_ns, header.encoding, payload, shape, header.dtype.name
    )


def parse_imagezmq(parts: list, receive_ns: int, max_bytes: int, next_id) -> FrameIn:
    """imagezmq's [json {"msg", "dtype", "shape"} | {"msg"[, "jpg_buffer"]}, payload] -> FrameIn."""
    if len(parts) != 2:
        raise ProtocolError(f"imagezmq: expected 2 message parts, got {len(parts)}")
    raw = parts[0].bytes
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"imagezmq: header is {len(raw)} bytes, limit {MAX_HEADER_BYTES}")
    try:
        md = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"imagezmq: header is not JSON: {exc}") from exc
    if not isinstance(md, dict) or not isinstance(md.get("msg"), str):
        raise ProtocolError("imagezmq: header must be a JSON object with a string 'msg' (the camera id)")
    cam = md["msg"]
    if not cam or len(cam) > MAX_CAMERA_ID or "/" in cam or not cam.isprintable():
        raise ProtocolError(f"imagezmq: msg must be a camera id of 1..{MAX_CAMERA_ID} characters without '/'")
    payload = parts[1].buffer
    fid = next_id(cam)
    if len(payload) == 0 or len(payload) > max_bytes:
        raise ProtocolError(f"imagezmq: payload of {len(payload)} bytes (limit {max_bytes})", cam, fid)
    if "shape" not in md and "dtype" not in md:
        return FrameIn(cam, fid, receive_ns, receive_ns, "jpeg", payload)
    shape, dtype = md.get("shape"), md.get("dtype")
    ok_shape = (
        isinstance(shape, list)
        and len(shape) in (2, 3)
        and all(isinstance(v, int) and v > 0 for v in shape)
        and (len(shape) == 2 or shape[2] in (1, 3, 4))
    )
    if not ok_shape or dtype not in ("uint8", "uint16"):
        raise ProtocolError(f"imagezmq: unsupported array shape {shape!r} / dtype {dtype!r}", cam, fid)
    if int(np.prod(shape)) * np.dtype(dtype).itemsize != len(payload):
        raise ProtocolError(
            f"imagezmq: payload is {len(payload)} bytes, shape {shape} {dtype} needs "
            f"{int(np.prod(shape)) * np.dtype(dtype).itemsize}",
            cam,
            fid,
        )
    return FrameIn(cam, fid, receive_ns, receive_ns, "imagezmq-raw", payload, tuple(shape), dtype)


@dataclass
class _WorkerState:
    gen: int
    credit: int
    sock: zmq.Socket


class Ingest:
    def __init__(self, cfg: DaemonConfig, ring: SlotRing, ctx: zmq.Context):
        self.cfg, self.ring, self.ctx = cfg, ring, ctx
        self.free = FreeList(ring.slots)
        self.queue: deque[dict] = deque()
        self.inflight: dict[int, dict[int, dict]] = {
            i: {} for i in range(cfg.workers)
        }  # worker -> slot -> desc
        self.workers: dict[int, _WorkerState | None] = dict.fromkeys(range(cfg.workers))
        self.metrics = Metrics()
        self.cam = CameraLabels(c.id for c in cfg.cameras)
        self.logger = get_logger()
        self.received = 0
        self.stopping_until: float | None = None
        self._ids: dict[str, int] = {}
        self.max_payload = cfg.max_frame.nbytes
        self._open_sockets()

    # ---- sockets ----------------------------------------------------------------------------------------
    def _open_sockets(self) -> None:
        cfg, rt = self.cfg, self.cfg.runtime_path
        self.curve = None
        if cfg.curve is not None and cfg.curve.on_ingest:
            self.curve = CurveServer(self.ctx, cfg.curve.server_secret, cfg.curve.clients_dir)
        hard_limit = 4 * self.max_payload + (1 << 20)  # beyond this a peer is cut off without a record
        self.frames = make_socket(
            self.ctx,
            zmq.PULL if cfg.endpoints.ingest_mode == "pull" else zmq.SUB,
            maxmsgsize=hard_limit,
            rcvhwm=max(4, cfg.queue.size),
        )
        self._attach(self.frames, cfg.endpoints.ingest, cfg.endpoints.ingest_mode == "pull")
        self.izmq = None
        if cfg.endpoints.imagezmq:
            rep = cfg.endpoints.imagezmq_mode == "rep"
            self.izmq = make_socket(self.ctx, zmq.REP if rep else zmq.SUB, maxmsgsize=hard_limit)
            self._attach(self.izmq, cfg.endpoints.imagezmq, rep)
        self.ctl = make_socket(self.ctx, zmq.PULL)
        self.ctl.bind(ipc_endpoint(rt, "ingest.ipc"))
        self.work = {}
        for i in range(cfg.workers):
            self.work[i] = make_socket(self.ctx, zmq.PUSH, sndhwm=0)
            self.work[i].bind(ipc_endpoint(rt, f"work-{i}.ipc"))
        self.records = make_socket(self.ctx, zmq.PUSH, sndhwm=0)
        self.records.connect(ipc_endpoint(rt, "publisher.ipc"))
        self.stats = make_socket(self.ctx, zmq.PUSH, sndhwm=100)
        self.stats.connect(ipc_endpoint(rt, "stats.ipc"))

    def _attach(self, sock: zmq.Socket, endpoint: str, bind: bool) -> None:
        if self.curve is not None:
            self.curve.secure(sock)
        if sock.type == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.bind(endpoint) if bind else sock.connect(endpoint)

    def close(self) -> None:
        for sock in [self.frames, self.izmq, self.ctl, *self.work.values()]:
            if sock is not None:
                close_socket(sock)
        for sock in (self.records, self.stats):
            close_socket(sock, linger_ms=2000)
        if self.curve is not None:
            self.curve.stop()

    # ---- records ----------------------------------------------------------------------------------------
    def _emit(
        self, kind: str, camera_id: str, frame_id, reason: str, capture_ns=None, receive_ns=None
    ) -> None:
        record = make_record(
            kind, camera_id, frame_id, capture_ns=capture_ns, receive_ns=receive_ns, reason=reason
        )
        send_msg(self.records, {"t": "rec", "record": record})

    def _emit_desc(self, kind: str, desc: dict, reason: str) -> None:
        self._emit(kind, desc["camera_id"], desc["frame_id"], reason, desc["capture_ns"], desc["receive_ns"])

    # ---- frames in ----------------------------------------------------------------------------------------
    def _next_id(self, camera_id: str) -> int:
        """imagezmq frame ids, counted per camera; bounded: the least recent of too many ids restarts."""
        fid = self._ids.pop(camera_id, -1) + 1
        self._ids[camera_id] = fid
        if len(self._ids) > MAX_IMAGEZMQ_CAMERAS:
            del self._ids[next(iter(self._ids))]
        return fid

    def on_message(self, parts: list, imagezmq: bool) -> None:
        receive_ns = time.time_ns()
        self.received += 1
        try:
            frame = (
                parse_imagezmq(parts, receive_ns, self.max_payload, self._next_id)
                if imagezmq
                else parse_protocol(parts, receive_ns, self.max_payload)
            )
        except ProtocolError as exc:
            self._reject(exc, receive_ns)
            return
        except Exception as exc:  # a parser bug must cost one error record, never the ingest process
            log(self.logger, "frame.parse_failed", logging.ERROR, exc_info=True)
            self._reject(
                ProtocolError(f"internal error while parsing: {type(exc).__name__}: {exc}"), receive_ns
            )
            return
        self.metrics.inc("edge_frames_received_total", self.cam(frame.camera_id))
        self._admit(frame)

    def _reject(self, exc: ProtocolError, receive_ns: int) -> None:
        self.metrics.inc("edge_frames_received_total", self.cam(exc.camera_id))
        self.metrics.inc("edge_protocol_errors_total", self.cam(exc.camera_id))
        log(self.logger, "frame.rejected", logging.DEBUG, camera=exc.camera_id, reason=exc.reason)
        self._emit("error", exc.camera_id, exc.frame_id, exc.reason, receive_ns=receive_ns)

    def _admit(self, frame: FrameIn) -> None:
        if len(self.queue) >= self.cfg.queue.size:
            if self.cfg.queue.drop_policy == "reject-newest":
                self._emit(
                    "drop",
                    frame.camera_id,
                    frame.frame_id,
                    "queue full (reject-newest)",
                    frame.capture_ns,
                    frame.receive_ns,
                )
                return
            old = self.queue.popleft()
            self.free.release(old["slot"])
            self._emit_desc("drop", old, "queue full (drop-oldest)")
        slot = self.free.acquire()
        if slot is None:
            self._emit(
                "drop",
                frame.camera_id,
                frame.frame_id,
                "no free shared-memory slot",
                frame.capture_ns,
                frame.receive_ns,
            )
            return
        try:
            shape, dtype = decode_into(
                frame, self.ring, slot, self.cfg.max_frame.width, self.cfg.max_frame.height
            )
        except Exception as exc:  # ProtocolError; anything else is a decoder bug, still one record
            self.free.release(slot)
            self.metrics.inc("edge_protocol_errors_total", self.cam(frame.camera_id))
            if isinstance(exc, ProtocolError):
                reason = exc.reason
            else:
                log(self.logger, "frame.decode_failed", logging.ERROR, exc_info=True, camera=frame.camera_id)
                reason = f"internal error while decoding: {type(exc).__name__}: {exc}"
            self._emit("error", frame.camera_id, frame.frame_id, reason, frame.capture_ns, frame.receive_ns)
            return
        self.queue.append(
            {
                "slot": slot,
                "shape": list(shape),
                "dtype": dtype,
                "camera_id": frame.camera_id,
                "frame_id": frame.frame_id,
                "capture_ns": frame.capture_ns,
                "receive_ns": frame.receive_ns,
            }
        )

    # ---- workers ----------------------------------------------------------------------------------------
    def dispatch(self) -> None:
        while self.queue:
            ready = [(st.credit, i) for i, st in self.workers.items() if st is not None and st.credit > 0]
            if not ready:
                return
            _, index = max(ready)
            state = self.workers[index]
            desc = {**self.queue.popleft(), "gen": state.gen}
            state.credit -= 1
            self.inflight[index][desc["slot"]] = desc
            send_msg(self.work[index], desc)

    def on_control(self, msg: dict) -> None:
        kind = msg.get("t")
        if kind == "hello":
            self._worker_lost(msg["worker"], None, "worker restarted")
            self.workers[msg["worker"]] = _WorkerState(msg["gen"], msg["credit"], self.work[msg["worker"]])
            log(self.logger, "worker.attached", worker=msg["worker"], gen=msg["gen"], credit=msg["credit"])
        elif kind == "done":
            self._done(msg["worker"], msg["gen"], msg["slots"])
        elif kind == "worker_lost":
            self._worker_lost(msg["worker"], msg["gen"], "worker lost")
        elif kind == "stop":
            self.stopping_until = time.monotonic() + float(msg.get("timeout_s", 10.0))
            self._stop_receiving()
        else:
            log(self.logger, "control.unknown", logging.WARNING, kind=str(kind))

    def _done(self, index: int, gen: int, slots: list[int]) -> None:
        state = self.workers.get(index)
        for slot in slots:
            desc = self.inflight[index].get(slot)
            if desc is None or desc["gen"] != gen:
                continue  # already accounted as lost
            del self.inflight[index][slot]
            self.free.release(slot)
            if state is not None and state.gen == gen:
                state.credit += 1

    def _worker_lost(self, index: int, gen: int | None, reason: str) -> None:
        """Frames held by ``index`` (of generation ``gen``, or any older one) get an error record."""
        state = self.workers.get(index)
        lost = [d for d in self.inflight[index].values() if gen is None or d["gen"] == gen]
        for desc in lost:
            del self.inflight[index][desc["slot"]]
            self.free.release(desc["slot"])
            self._emit_desc("error", desc, reason)
        if state is not None and (gen is None or state.gen == gen):
            self.workers[index] = None
        if lost:
            log(
                self.logger,
                "worker.lost_frames",
                logging.WARNING,
                worker=index,
                frames=len(lost),
                reason=reason,
            )

    # ---- shutdown ---------------------------------------------------------------------------------------
    def _stop_receiving(self) -> None:
        """Stop taking frames. Messages already inside our sockets' buffers are taken first (each gets its
        record); what a camera still holds in its own queue stays there for the next daemon."""
        taken = 0
        for sock, imagezmq in ((self.frames, False), (self.izmq, True)):
            if sock is not None and not sock.closed:
                taken += self._receive(sock, imagezmq, STOP_DRAIN_LIMIT)
                close_socket(sock)
        log(self.logger, "ingest.stopping", queued=len(self.queue), inflight=self.n_inflight, taken=taken)

    @property
    def n_inflight(self) -> int:
        return sum(len(v) for v in self.inflight.values())

    @property
    def drained(self) -> bool:
        return not self.queue and self.n_inflight == 0

    def abandon(self, reason: str) -> None:
        """Give every frame still queued or in flight its error record (shutdown timeout)."""
        while self.queue:
            desc = self.queue.popleft()
            self.free.release(desc["slot"])
            self._emit_desc("error", desc, reason)
        for index in list(self.inflight):
            self._worker_lost(index, None, reason)

    def snapshot(self) -> dict:
        self.metrics.set("edge_queue_depth", len(self.queue))
        self.metrics.set("edge_slots_in_use", self.free.in_use)
        self.metrics.set("edge_inflight_frames", self.n_inflight)
        return self.metrics.snapshot()

    def _send_stats(self) -> None:
        try:
            send_msg(self.stats, {"t": "stats", "source": "ingest", "snapshot": self.snapshot()}, zmq.NOBLOCK)
        except zmq.Again:  # supervisor busy: the next snapshot carries the same counters
            pass

    # ---- loop -------------------------------------------------------------------------------------------
    def _poll_sockets(self, poller: zmq.Poller, timeout_ms: int) -> None:
        events = dict(poller.poll(timeout_ms))
        if self.ctl in events:
            for _ in range(1000):
                try:
                    self.on_control(recv_msg(self.ctl, zmq.NOBLOCK))
                except zmq.Again:
                    break
        for sock, imagezmq in ((self.frames, False), (self.izmq, True)):
            if sock is not None and not sock.closed and sock in events:
                self._receive(sock, imagezmq, 64)

    def _receive(self, sock: zmq.Socket, imagezmq: bool, limit: int) -> int:
        """Take up to ``limit`` waiting messages from an external socket; returns how many."""
        for n in range(limit):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return n
            if sock.type == zmq.REP:
                sock.send(b"OK")
            self.on_message(parts, imagezmq)
        return limit

    def run(self, should_exit) -> None:
        last_stats = 0.0
        while True:
            poller = zmq.Poller()
            for sock in (self.ctl, self.frames, self.izmq):
                if sock is not None and not sock.closed:
                    poller.register(sock, zmq.POLLIN)
            self._poll_sockets(poller, 50)
            self.dispatch()
            now = time.monotonic()
            if now - last_stats >= 0.5:
                self._send_stats()
                last_stats = now
            if should_exit():
                return
            if self.stopping_until is not None and (self.drained or now > self.stopping_until):
                if not self.drained:
                    self.abandon("not processed before the shutdown timeout")
                self._send_stats()
                send_msg(self.stats, {"t": "drained", "received": self.received})
                log(self.logger, "ingest.drained", received=self.received)
                return


def run_ingest(cfg: DaemonConfig, ring_name: str, slot_bytes: int, should_exit) -> int:
    ring = SlotRing.attach(ring_name, cfg.queue.slots, slot_bytes)
    ctx = zmq.Context()
    ingest = Ingest(cfg, ring, ctx)
    log(get_logger(), "ingest.started", endpoint=cfg.endpoints.ingest, imagezmq=cfg.endpoints.imagezmq or "-")
    try:
        ingest.run(should_exit)
    finally:
        ingest.close()
        ctx.term()
        ring.close()
    return 0
