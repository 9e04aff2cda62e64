"""Publisher process: records from ingest and workers -> PUB socket (topic = camera id).

Sockets
  in     PULL bind ipc ``publisher.ipc``: ``{"t": "rec", "record", "map"?}``; ``{"t": "stop", "expect"}``
  out    PUB bind ``endpoints.output`` (CURVE optional): ``[camera_id, msgpack record]`` and, when maps are
         on, ``[camera_id + "/map", msgpack {frame_id, shape, dtype, data}]``
  stats  PUSH connect ipc ``stats.ipc``: counters by kind and camera (the accounting's ground truth)

On ``stop`` it keeps publishing until it has sent ``expect`` records (the number of messages ingest
received: one record each) or the deadline passes, then exits.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import zmq

from .config import DaemonConfig
from .logs import get_logger, log
from .metrics import CameraLabels, Metrics
from .protocol import pack
from .transport import CurveServer, close_socket, ipc_endpoint, make_socket, recv_msg, send_msg

__all__ = ["Publisher", "run_publisher", "KIND_COUNTERS"]

DEDUP_WINDOW = 8192  # records remembered for de-duplication (a worker-lost duplicate follows within ~1 s)
MAX_SEQ_CAMERAS = 1024  # camera ids with a sequence counter (a forgotten one restarts at 0)

KIND_COUNTERS = {
    "verdict": "edge_frames_answered_total",
    "error": "edge_frames_failed_total",
    "drop": "edge_frames_dropped_total",
}


class Publisher:
    def __init__(self, cfg: DaemonConfig, ctx: zmq.Context):
        self.cfg = cfg
        self.metrics = Metrics()
        self.cam = CameraLabels(c.id for c in cfg.cameras)
        self.logger = get_logger()
        self.published = 0
        self.curve = None
        if cfg.curve is not None and cfg.curve.on_output:
            self.curve = CurveServer(ctx, cfg.curve.server_secret, cfg.curve.clients_dir)
        self.inp = make_socket(ctx, zmq.PULL)
        self.inp.bind(ipc_endpoint(cfg.runtime_path, "publisher.ipc"))
        self.out = make_socket(ctx, zmq.PUB, sndhwm=cfg.endpoints.output_hwm)
        if self.curve is not None:
            self.curve.secure(self.out)
        self.out.bind(cfg.endpoints.output)
        self.stats = make_socket(ctx, zmq.PUSH, sndhwm=100)
        self.stats.connect(ipc_endpoint(cfg.runtime_path, "stats.ipc"))
        self.expect: int | None = None
        self._seq: dict[str, int] = {}
        self._recent: set[tuple] = set()
        self._order: deque[tuple] = deque()
        self.deadline = float("inf")

    def close(self) -> None:
        close_socket(self.inp)
        close_socket(self.out, linger_ms=1000)
        close_socket(self.stats, linger_ms=2000)
        if self.curve is not None:
            self.curve.stop()

    def on_message(self, msg: dict) -> None:
        kind = msg.get("t")
        if kind == "stop":
            self.expect = int(msg.get("expect", 0))
            self.deadline = time.monotonic() + float(msg.get("timeout_s", 5.0))
            log(self.logger, "publisher.stopping", expect=self.expect, published=self.published)
            return
        if kind != "rec":
            log(self.logger, "publisher.unknown_message", logging.WARNING, kind=str(kind))
            return
        record = msg["record"]
        if self._seen_before(record):
            self.metrics.inc("edge_records_deduplicated_total", self.cam(record["camera_id"]))
            return
        topic = record["camera_id"].encode()
        # per-camera sequence number: a subscriber that finds a gap knows it missed records (slow reader
        # past its high-water mark, reconnect); it restarts at 0 with the publisher process
        seq = self._seq.pop(record["camera_id"], 0)
        self._seq[record["camera_id"]] = seq + 1  # most recent last: the oldest camera is forgotten first
        if len(self._seq) > MAX_SEQ_CAMERAS:
            del self._seq[next(iter(self._seq))]
        self.out.send_multipart([topic, pack({**record, "seq": seq})])
        if "map" in msg:
            self.out.send_multipart([topic + b"/map", pack({"frame_id": record["frame_id"], **msg["map"]})])
        self.published += 1
        self.metrics.inc(KIND_COUNTERS[record["kind"]], self.cam(record["camera_id"]))

    def _seen_before(self, record: dict) -> bool:
        """One record per frame: a worker killed after publishing but before returning the slot makes
        ingest send a second ("worker lost") record for the same frame; the first one wins."""
        key = (record["camera_id"], record["frame_id"], record["receive_ns"])
        if key in self._recent:
            return True
        self._recent.add(key)
        self._order.append(key)
        if len(self._order) > DEDUP_WINDOW:
            self._recent.discard(self._order.popleft())
        return False

    def _send_stats(self, block: bool = False) -> None:
        try:
            send_msg(
                self.stats,
                {"t": "stats", "source": "publisher", "snapshot": self.metrics.snapshot()},
                0 if block else zmq.NOBLOCK,
            )
        except zmq.Again:
            pass

    def done(self) -> bool:
        return self.expect is not None and (self.published >= self.expect or time.monotonic() > self.deadline)

    def run(self, should_exit) -> None:
        last_stats = 0.0
        while not self.done() and not should_exit():
            if self.inp.poll(50, zmq.POLLIN):
                for _ in range(1000):
                    try:
                        self.on_message(recv_msg(self.inp, zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if time.monotonic() - last_stats >= 0.5:
                self._send_stats()
                last_stats = time.monotonic()
        if self.expect is not None and self.published < self.expect:
            log(
                self.logger,
                "publisher.incomplete",
                logging.WARNING,
                expect=self.expect,
                published=self.published,
            )
        self._send_stats(block=True)
        send_msg(self.stats, {"t": "published", "count": self.published})
        log(self.logger, "publisher.stopped", published=self.published)


def run_publisher(cfg: DaemonConfig, should_exit) -> int:
    ctx = zmq.Context()
    pub = Publisher(cfg, ctx)
    log(get_logger(), "publisher.started", endpoint=cfg.endpoints.output)
    try:
        pub.run(should_exit)
    finally:
        pub.close()
        ctx.term()
    return 0
