"""Publisher process: records from ingest and workers -> PUB socket (topic = camera id).

Sockets
  in     PULL bind ipc ``publisher.ipc``: ``{"t": "rec", "record", "map"?}``; ``{"t": "stop", "expect"}``
  out    PUB bind ``endpoints.output`` (CURVE optional): ``[camera_id, msgpack record]`` and, when maps are
         on, ``[camera_id + "/map", msgpack {v, camera_id, frame_id, seq, shape, dtype, data}]``
  stats  PUSH connect ipc ``stats.ipc``: counters by kind and camera label (the accounting's ground truth)

Topics are only ever a valid camera id (cameras.py), ``<id>/map`` or ``unknown``. Every record carries
``seq`` (per topic, +1 per record) and ``seq_epoch`` (which numbering it belongs to): configured cameras and
``unknown`` keep their numbering for the publisher's life; other ids share a bounded table, and an id that
was forgotten restarts at 0 under a new epoch, so a subscriber can always tell a gap.

On ``stop`` it keeps publishing until it has sent ``expect`` records (the number of messages ingest
received: one record each) or the deadline passes, then exits.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque

import numpy as np
import zmq

from .cameras import UNKNOWN_CAMERA, CameraCounters, CameraLabels, camera_or_unknown
from .config import DaemonConfig
from .logs import get_logger, log
from .metrics import Metrics
from .protocol import PROTOCOL_VERSION, pack
from .transport import CurveServer, close_socket, ipc_endpoint, make_socket, recv_msg, send_msg

__all__ = ["Publisher", "run_publisher", "KIND_COUNTERS"]

DEDUP_WINDOW = 8192  # records remembered for de-duplication (a worker-lost duplicate follows within ~1 s)
MAX_SEQ_CAMERAS = 1024  # unconfigured camera ids with a sequence counter (a forgotten one: new seq_epoch)

KIND_COUNTERS = {
    "verdict": "edge_frames_answered_total",
    "error": "edge_frames_failed_total",
    "drop": "edge_frames_dropped_total",
}


class Publisher:
    """``local=True`` (single-process mode, single.py): no ``in`` and no ``stats`` socket; the caller hands
    records to ``on_message`` and reports the metrics. ``curve``: a CurveServer to share (one authenticator
    per process); by default the publisher makes its own when the config asks for CURVE."""

    def __init__(self, cfg: DaemonConfig, ctx: zmq.Context, local: bool = False, curve=None):
        self.cfg = cfg
        configured = [c.id for c in cfg.cameras]
        self.labels = CameraLabels(configured)
        self.metrics = Metrics()
        for name in (*KIND_COUNTERS.values(), "edge_records_deduplicated_total"):
            self.metrics.declare(name, [{"camera": v} for v in self.labels.values()])
        self._seq = CameraCounters([*configured, UNKNOWN_CAMERA], MAX_SEQ_CAMERAS)
        self.logger = get_logger()
        self.published = 0
        secure = cfg.curve is not None and cfg.curve.on_output
        self._own_curve = curve is None
        self.curve = curve
        if secure and curve is None:
            self.curve = CurveServer(ctx, cfg.curve.server_secret, cfg.curve.clients_dir)
        self.inp = None
        if not local:
            self.inp = make_socket(ctx, zmq.PULL)
            self.inp.bind(ipc_endpoint(cfg.runtime_path, "publisher.ipc"))
        self.out = make_socket(ctx, zmq.PUB, sndhwm=cfg.endpoints.output_hwm)
        if secure:
            self.curve.secure(self.out)
        self.out.bind(cfg.endpoints.output)
        self.stats = None
        if not local:
            self.stats = make_socket(ctx, zmq.PUSH, sndhwm=100)
            self.stats.connect(ipc_endpoint(cfg.runtime_path, "stats.ipc"))
        self.expect: int | None = None
        self._recent: set[tuple] = set()
        self._order: deque[tuple] = deque()
        self.deadline = float("inf")

    def close(self) -> None:
        if self.inp is not None:
            close_socket(self.inp)
        close_socket(self.out, linger_ms=1000)
        if self.stats is not None:
            close_socket(self.stats, linger_ms=2000)
        if self.curve is not None and self._own_curve:
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
        record["camera_id"] = camera = camera_or_unknown(record.get("camera_id"))  # ingest validated it
        if self._seen_before(record):
            self.metrics.inc("edge_records_deduplicated_total", self.labels(camera))
            return
        seq, epoch = self._seq.next(camera)
        topic = camera.encode()
        self.out.send_multipart([topic, pack({**record, "seq": seq, "seq_epoch": epoch})])
        if "map" in msg:
            self.out.send_multipart([topic + b"/map", pack(_map_message(record, seq, msg["map"]))])
        self.published += 1
        self.metrics.inc(KIND_COUNTERS[record["kind"]], self.labels(camera))

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

    def step(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for records and publish what is there."""
        if self.inp.poll(timeout_ms, zmq.POLLIN):
            for _ in range(1000):
                try:
                    self.on_message(recv_msg(self.inp, zmq.NOBLOCK))
                except zmq.Again:
                    return

    def run(self, should_exit) -> None:
        last_stats = 0.0
        while not self.done() and not should_exit():
            self.step(50)
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


def _map_message(record: dict, seq: int, anomaly_map: dict) -> dict:
    """The map that follows a verdict: float32 little-endian, row-major, ``shape`` [rows, cols]; ``seq`` is
    the verdict's (maps have no numbering of their own)."""
    data = anomaly_map["data"]
    if sys.byteorder != "little":
        data = np.frombuffer(data, "=f4").astype("<f4").tobytes()
    return {
        "v": PROTOCOL_VERSION,
        "camera_id": record["camera_id"],
        "frame_id": record["frame_id"],
        "seq": seq,
        "shape": list(anomaly_map["shape"]),
        "dtype": "float32",
        "data": data,
    }


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
