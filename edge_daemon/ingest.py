"""Ingest process: camera messages -> validated frames in shared-memory slots -> descriptors to workers.

Sockets
  frames    PULL bind (default) or SUB connect on ``endpoints.ingest``: protocol v1 [msgpack header, payload]
  imagezmq  optional REP bind (answers b'OK' to every message) or SUB connect: imagezmq's [json, payload]
  monitors  libzmq monitors of frames and imagezmq: connection events, counted (over-size messages)
  ctl       PULL bind ipc ``ingest.ipc``: worker hello/done (credits, released slots), supervisor commands
  work-<i>  PUSH bind ipc per worker: descriptors, only while that worker has credit
  records   PUSH connect to the publisher: error and drop records made here
  stats     PUSH connect to the supervisor: metric snapshots, ``drained`` at the end

A raw mono8/mono16/rgb8 payload is received straight into its slot (``Socket.recv_into``: libzmq copies
it once out of its receive buffer, the copy the frame needs anyway); every other message is received whole
and decoded or copied into its slot. Both paths answer alike (tests/test_ingest_direct.py).

Ingest alone owns the slot free list and the bounded queue of frames waiting for a worker; a frame is handed
to a worker with credit as soon as it is read, and only when none has credit does it wait; when the queue is
full the drop policy picks which frame gets a drop record. Every message that arrives gets exactly one
record, from here (error, drop, worker lost, shutdown) or from a worker (verdict, error). Messages the
transport refuses (a part over the hard size limit) never arrive: they are counted from the socket monitor.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from dataclasses import dataclass

import zmq

from .cameras import CameraCounters, CameraLabels
from .config import DaemonConfig
from .frames import FrameIn, check_payload_size, decode_into, direct_layout, parse_imagezmq, parse_protocol
from .logs import get_logger, log
from .metrics import Metrics
from .protocol import PROTOCOL_ERROR_CODES, ProtocolError, check_raw_payload, decode_header, make_record
from .shm import FreeList, SlotRing
from .transport import (
    TRANSPORT_EVENTS,
    CurveServer,
    SocketMonitor,
    close_socket,
    ipc_endpoint,
    make_socket,
    recv_msg,
    send_msg,
)

__all__ = ["Ingest", "run_ingest", "hard_limit", "MAX_IMAGEZMQ_CAMERAS"]

MAX_IMAGEZMQ_CAMERAS = 1024  # unconfigured imagezmq camera ids with a frame counter (configured ones: all)
RECEIVE_BATCH = 64  # messages taken from one external socket per loop iteration (each dispatched as read)
STOP_DRAIN_LIMIT = 4096  # messages taken from the external sockets' buffers when a stop arrives


def hard_limit(cfg: DaemonConfig) -> int:
    """ZMQ_MAXMSGSIZE of the camera sockets, per message part: 4 x max_frame bytes + 1 MiB. A part up to it
    gets an error record when it is over max_frame; a larger one makes libzmq drop the connection."""
    return 4 * cfg.max_frame.nbytes + (1 << 20)


@dataclass
class _WorkerState:
    gen: int
    credit: int


class Ingest:
    """The ingest process's state and loop. ``local=True`` (single-process mode, single.py): no sockets
    towards workers, the publisher or the supervisor's stats; ``attach_local`` gives the callables that
    take a worker's descriptors and the records instead, and frames are kept where they were received
    (``LocalSlots``) instead of being copied into shared memory. ``curve``: a CurveServer to share (one
    authenticator per process); by default ingest makes its own when the config asks for CURVE."""

    def __init__(self, cfg: DaemonConfig, ring, ctx: zmq.Context, *, local: bool = False, curve=None):
        self.cfg, self.ring, self.ctx, self.local = cfg, ring, ctx, local
        self.free = FreeList(ring.slots)
        self.queue: deque[dict] = deque()
        self.inflight: dict[int, dict[int, dict]] = {i: {} for i in range(cfg.workers)}  # worker->slot->desc
        self.workers: dict[int, _WorkerState | None] = dict.fromkeys(range(cfg.workers))
        configured = [c.id for c in cfg.cameras]
        self.labels = CameraLabels(configured)
        self.logger = get_logger()
        self.received = 0
        self.stopping_until: float | None = None
        self._izmq_ids = CameraCounters(configured, MAX_IMAGEZMQ_CAMERAS)
        # raw frames received straight into their shared-memory slot (pyzmq >= 26.4 has Socket.recv_into)
        self.direct = not local and hasattr(zmq.Socket, "recv_into")
        self._last_receive_ns = 0
        self.max_payload = cfg.max_frame.nbytes
        self.hard_limit = hard_limit(cfg)
        self._own_curve = curve is None
        self.curve = curve
        self.to_worker: dict = {}
        self.to_publisher = None
        self._open_sockets()
        self.metrics = Metrics()
        self._declare_metrics()

    def _declare_metrics(self) -> None:
        m = self.metrics
        m.declare("edge_frames_received_total", [{"camera": v} for v in self.labels.values()])
        m.declare("edge_protocol_errors_total", [{"reason": code} for code in PROTOCOL_ERROR_CODES])
        m.declare(
            "edge_transport_events_total",
            [{"socket": mon.name, "event": e} for mon in self.monitors for e in TRANSPORT_EVENTS],
        )

    # ---- sockets ----------------------------------------------------------------------------------------
    def _open_sockets(self) -> None:
        cfg, rt = self.cfg, self.cfg.runtime_path
        self._secure = cfg.curve is not None and cfg.curve.on_ingest
        if self._secure and self.curve is None:
            self.curve = CurveServer(self.ctx, cfg.curve.server_secret, cfg.curve.clients_dir)
        pull = cfg.endpoints.ingest_mode == "pull"
        self.frames = make_socket(
            self.ctx, zmq.PULL if pull else zmq.SUB, maxmsgsize=self.hard_limit, rcvhwm=max(4, cfg.queue.size)
        )
        self.monitors = [SocketMonitor(self.frames, "frames")]
        self._attach(self.frames, cfg.endpoints.ingest, pull)
        self.izmq = None
        if cfg.endpoints.imagezmq:
            rep = cfg.endpoints.imagezmq_mode == "rep"
            self.izmq = make_socket(self.ctx, zmq.REP if rep else zmq.SUB, maxmsgsize=self.hard_limit)
            self.monitors.append(SocketMonitor(self.izmq, "imagezmq"))
            self._attach(self.izmq, cfg.endpoints.imagezmq, rep)
        self.ctl = make_socket(self.ctx, zmq.PULL)
        self.ctl.bind(ipc_endpoint(rt, "ingest.ipc"))
        self.work, self.records, self.stats = {}, None, None
        if self.local:
            return
        for i in range(cfg.workers):
            self.work[i] = make_socket(self.ctx, zmq.PUSH, sndhwm=0)
            self.work[i].bind(ipc_endpoint(rt, f"work-{i}.ipc"))
            self.to_worker[i] = functools.partial(send_msg, self.work[i])
        self.records = make_socket(self.ctx, zmq.PUSH, sndhwm=0)
        self.records.connect(ipc_endpoint(rt, "publisher.ipc"))
        self.to_publisher = functools.partial(send_msg, self.records)
        self.stats = make_socket(self.ctx, zmq.PUSH, sndhwm=100)
        self.stats.connect(ipc_endpoint(rt, "stats.ipc"))

    def attach_local(self, to_worker, to_publisher) -> None:
        """Single-process mode: ``to_worker(desc)`` (worker 0) and ``to_publisher(msg)`` are called
        directly where the sockets would be written."""
        self.to_worker = {0: to_worker}
        self.to_publisher = to_publisher

    def _attach(self, sock: zmq.Socket, endpoint: str, bind: bool) -> None:
        if self._secure:
            self.curve.secure(sock)
        if sock.type == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.bind(endpoint) if bind else sock.connect(endpoint)

    def _external(self) -> list[tuple[zmq.Socket, bool]]:
        """The camera sockets still open, with whether they speak imagezmq."""
        socks = [(self.frames, False), (self.izmq, True)]
        return [(s, izmq) for s, izmq in socks if s is not None and not s.closed]

    def close(self) -> None:
        for mon in self.monitors:
            mon.close()
        for sock in [self.frames, self.izmq, self.ctl, *self.work.values()]:
            if sock is not None:
                close_socket(sock)
        for sock in (self.records, self.stats):
            if sock is not None:
                close_socket(sock, linger_ms=2000)
        if self.curve is not None and self._own_curve:
            self.curve.stop()

    # ---- records ----------------------------------------------------------------------------------------
    def _emit(
        self, kind: str, code: str, camera_id: str, frame_id, reason: str, capture_ns=None, receive_ns=None
    ):
        record = make_record(
            kind, camera_id, frame_id, capture_ns=capture_ns, receive_ns=receive_ns, reason=reason, code=code
        )
        self.to_publisher({"t": "rec", "record": record})

    def _emit_desc(self, kind: str, code: str, desc: dict, reason: str) -> None:
        self._emit(
            kind, code, desc["camera_id"], desc["frame_id"], reason, desc["capture_ns"], desc["receive_ns"]
        )

    # ---- frames in ----------------------------------------------------------------------------------------
    def _receive_time(self) -> int:
        """Wall clock, strictly increasing: (camera_id, frame_id, receive_ns) names one message."""
        self._last_receive_ns = max(time.time_ns(), self._last_receive_ns + 1)
        return self._last_receive_ns

    def _next_izmq_id(self, camera_id: str) -> int:
        return self._izmq_ids.next(camera_id)[0]

    def on_message(self, parts: list, imagezmq: bool) -> None:
        receive_ns = self._receive_time()
        self.received += 1
        try:
            frame = (
                parse_imagezmq(parts, receive_ns, self.max_payload, self._next_izmq_id)
                if imagezmq
                else parse_protocol(parts, receive_ns, self.max_payload)
            )
        except ProtocolError as exc:
            self._reject(exc, receive_ns)
            return
        except Exception as exc:  # a parser bug must cost one error record, never the ingest process
            log(self.logger, "frame.parse_failed", logging.ERROR, exc_info=True)
            reason = f"internal error while parsing: {type(exc).__name__}: {exc}"[:300]
            self._reject(ProtocolError(reason, code="internal"), receive_ns)
            return
        self.metrics.inc("edge_frames_received_total", self.labels(frame.camera_id))
        self._admit(frame)

    def _reject(self, exc: ProtocolError, receive_ns: int, capture_ns=None, counted: bool = False) -> None:
        if not counted:
            self.metrics.inc("edge_frames_received_total", self.labels(exc.camera_id))
        self.metrics.inc("edge_protocol_errors_total", {"reason": exc.code})
        log(
            self.logger,
            "frame.rejected",
            logging.DEBUG,
            camera=exc.camera_id,
            code=exc.code,
            reason=exc.reason,
        )
        self._emit("error", exc.code, exc.camera_id, exc.frame_id, exc.reason, capture_ns, receive_ns)

    def _make_room(self, frame: FrameIn) -> bool:
        """Apply the drop policy when the queue is full; False when ``frame`` itself was dropped."""
        if len(self.queue) >= self.cfg.queue.size:
            if self.cfg.queue.drop_policy == "reject-newest":
                self._drop_new(frame, "queue full (reject-newest)", "queue_full")
                return False
            old = self.queue.popleft()
            self._release(old["slot"])
            self._emit_desc("drop", "queue_full", old, "queue full (drop-oldest)")
        return True

    def _admit(self, frame: FrameIn) -> None:
        if not self._make_room(frame):
            return
        slot = self.free.acquire()
        if slot is None:
            self._drop_new(frame, "no free shared-memory slot", "no_slot")
            return
        try:
            shape, dtype = self._store(frame, slot)
        except Exception as exc:  # ProtocolError; anything else is a decoder bug, still one record
            self._release(slot)
            if not isinstance(exc, ProtocolError):
                log(self.logger, "frame.decode_failed", logging.ERROR, exc_info=True, camera=frame.camera_id)
                reason = f"internal error while decoding: {type(exc).__name__}: {exc}"[:300]
                exc = frame.error(reason, "internal")
            self._reject(exc, frame.receive_ns, frame.capture_ns, counted=True)
            return
        self._enqueue(frame, slot, shape, dtype)

    def _enqueue(self, frame: FrameIn, slot: int, shape: tuple[int, ...], dtype: str) -> None:
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

    # ---- raw frames received straight into their slot -----------------------------------------------------
    def _receive_direct(self, sock: zmq.Socket, first: zmq.Frame) -> bool:
        """A protocol message whose header (``first``, already read) names a raw frame that a slot stores
        as it arrives: its payload part is received into a free slot (``recv_into``: libzmq copies it out
        of its own buffer once, the copy ``decode_into`` would make). False, with nothing more read, when
        it does not apply (then the ordinary path takes the message). Errors and checks are those of the
        ordinary path, in its order: parts, header, payload."""
        try:
            header = decode_header(first.buffer)
        except ProtocolError:
            return False
        mf = self.cfg.max_frame
        layout = direct_layout(header, mf.width, mf.height, min(self.ring.slot_bytes, self.max_payload))
        if layout is None or self.free.available == 0:
            return False
        shape, nbytes = layout
        receive_ns = self._receive_time()
        self.received += 1
        slot = self.free.acquire()
        frame = FrameIn(header.camera_id, header.frame_id, header.timestamp_ns, receive_ns, header.encoding,
                        memoryview(b""), shape, header.dtype.name)
        try:
            n = sock.recv_into(self.ring.view(slot, (nbytes,), "uint8"), flags=zmq.NOBLOCK)
            extra = _discard_rest(sock)
            if extra:
                raise frame.error(f"expected 2 message parts [header, payload], got {2 + extra}", "parts")
            check_payload_size(n, self.max_payload, header.camera_id, header.frame_id)
            check_raw_payload(header, n)
        except Exception as exc:  # ProtocolError; anything else is a bug, still one record
            self._release(slot)
            if not isinstance(exc, ProtocolError):
                log(self.logger, "frame.receive_failed", logging.ERROR, exc_info=True)
                _discard_rest(sock)  # the next read must start a new message
                exc = frame.error(f"internal error while receiving: {type(exc).__name__}: {exc}"[:300],
                                  "internal")
            self._reject(exc, receive_ns)
            return True
        self.metrics.inc("edge_frames_received_total", self.labels(frame.camera_id))
        if self._make_room(frame):
            self._enqueue(frame, slot, shape, header.dtype.name)
        else:
            self._release(slot)
        return True

    def _store(self, frame: FrameIn, slot: int) -> tuple[tuple[int, ...], str]:
        """Pixels into the slot (decoded or copied once); the slot view's (shape, dtype)."""
        return decode_into(frame, self.ring, slot, self.cfg.max_frame.width, self.cfg.max_frame.height)

    def _release(self, slot: int) -> None:
        self.free.release(slot)

    def _drop_new(self, frame: FrameIn, reason: str, code: str) -> None:
        self._emit("drop", code, frame.camera_id, frame.frame_id, reason, frame.capture_ns, frame.receive_ns)

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
            self.to_worker[index](desc)

    def on_control(self, msg: dict) -> None:
        kind = msg.get("t")
        if kind == "hello":
            self._worker_lost(msg["worker"], None, "worker restarted")
            self.workers[msg["worker"]] = _WorkerState(msg["gen"], msg["credit"])
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
            self._release(slot)
            if state is not None and state.gen == gen:
                state.credit += 1

    def _worker_lost(self, index: int, gen: int | None, reason: str, code: str = "worker_lost") -> None:
        """Frames held by ``index`` (of generation ``gen``, or any older one) get an error record."""
        state = self.workers.get(index)
        lost = [d for d in self.inflight[index].values() if gen is None or d["gen"] == gen]
        for desc in lost:
            del self.inflight[index][desc["slot"]]
            self._release(desc["slot"])
            self._emit_desc("error", code, desc, reason)
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
        for sock, imagezmq in self._external():
            taken += self._receive(sock, imagezmq, STOP_DRAIN_LIMIT)
        self._count_transport()
        for mon in self.monitors:
            mon.close()
        for sock, _ in self._external():
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
            self._release(desc["slot"])
            self._emit_desc("error", "shutdown", desc, reason)
        for index in list(self.inflight):
            self._worker_lost(index, None, reason, "shutdown")

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
    def _receive(self, sock: zmq.Socket, imagezmq: bool, limit: int) -> int:
        """Take up to ``limit`` waiting messages from a camera socket, each handed to a worker (when one has
        credit) before the next is read; returns how many."""
        direct = self.direct and not imagezmq
        for n in range(limit):
            try:
                first = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return n
            if not (direct and first.more and self._receive_direct(sock, first)):
                parts = [first]
                while parts[-1].more:  # the rest of a multipart message is there (atomic delivery)
                    parts.append(sock.recv(zmq.NOBLOCK, copy=False))
                if sock.type == zmq.REP:
                    sock.send(b"OK")
                self.on_message(parts, imagezmq)
            self.dispatch()
        return limit

    def _count_transport(self) -> None:
        for mon in self.monitors:
            for event in mon.drain():
                self.metrics.inc("edge_transport_events_total", {"socket": mon.name, "event": event})
                log(self.logger, f"transport.{event}", logging.DEBUG, socket=mon.name)

    def _control(self) -> None:
        for _ in range(1000):
            try:
                self.on_control(recv_msg(self.ctl, zmq.NOBLOCK))
            except zmq.Again:
                return

    def step(self, timeout_ms: int) -> None:
        """One loop iteration: wait up to ``timeout_ms`` for any socket, handle what is there, dispatch."""
        poller = zmq.Poller()
        poller.register(self.ctl, zmq.POLLIN)
        external = self._external()
        for sock, _ in external:
            poller.register(sock, zmq.POLLIN)
        monitors = [m.socket for m in self.monitors if not m.socket.closed]
        for sock in monitors:
            poller.register(sock, zmq.POLLIN)
        events = dict(poller.poll(timeout_ms))
        if self.ctl in events:
            self._control()
        if any(sock in events for sock in monitors):
            self._count_transport()
        for sock, imagezmq in external:
            if sock in events and not sock.closed:
                self._receive(sock, imagezmq, RECEIVE_BATCH)
        self.dispatch()

    def run(self, should_exit) -> None:
        last_stats = 0.0
        while True:
            self.step(50)
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


def _discard_rest(sock: zmq.Socket) -> int:
    """Read and drop the remaining parts of the message being received; how many there were."""
    extra = 0
    while sock.get(zmq.RCVMORE):
        sock.recv(zmq.NOBLOCK, copy=False)
        extra += 1
    return extra


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
