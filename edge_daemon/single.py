"""Single-process mode (``process_mode: single``): ingest, one worker and the publisher in one loop.

For one-worker CPU deployments, where every hop between processes is a wake-up on a busy core. The frame's
path has no hop and no copy into shared memory:

    camera --zmq--> LocalIngest (validate; raw frames stay in the received message, JPEG/PNG decoded)
            --call--> FrameInspector.add (tiles copied out at once) ... engine batches ... fusion, verdict
            --call--> Publisher.on_message --PUB--> subscribers

The same objects as the multi-process daemon do the work (``Ingest`` with its queue, drop policy, credit and
accounting; the worker's ``FrameInspector``; ``Publisher`` with de-duplication and seq), joined by calls
instead of sockets, so every message still gets exactly one record. The supervisor stays a separate process
(shutdown path, sd_notify, /metrics). What is given up (docs/reliability.md): a crash of this process is
fatal, as a dead ingest or publisher is in the multi-process mode (exit 1, systemd restarts the unit), and
the frames it held get no record; in the multi-process mode a dead worker is restarted and its frames get
``worker lost`` records.

Sockets
  frames, imagezmq, monitors   as ingest.py
  ctl     PULL bind ipc ``ingest.ipc``: supervisor commands (stop)
  out     PUB bind ``endpoints.output`` (publisher.py)
  stats   PUSH connect ipc ``stats.ipc``: ``ready`` once warm, one merged snapshot every 0.5 s, ``drained``
          and ``published`` at the end
"""

from __future__ import annotations

import logging
import time

import numpy as np
import zmq

from .config import DaemonConfig
from .frames import FrameIn, decode_frame
from .ingest import Ingest
from .logs import get_logger, log
from .metrics import Metrics
from .publisher import Publisher
from .shm import ShmError
from .transport import CurveServer, close_socket, ipc_endpoint, make_socket, send_msg
from .worker import FrameInspector, gpu_memory, open_worker_engine

__all__ = ["LocalSlots", "LocalIngest", "SingleProcess", "run_single", "SOURCE"]

SOURCE = "single"  # the stats source name (and the supervisor's child role)
_GEN = 1  # one worker, never restarted in place


class LocalSlots:
    """Frame slots without shared memory: slot id -> the frame as ``decode_frame`` gave it (for raw mono and
    rgb8 frames a view of the received message: no copy). The ingest free list bounds them as it bounds
    the shared-memory slots; a released slot drops its frame."""

    def __init__(self, slots: int, slot_bytes: int):
        self.slots, self.slot_bytes = slots, slot_bytes
        self._frames: list[np.ndarray | None] = [None] * slots

    def keep(self, slot: int, pixels: np.ndarray) -> None:
        self._frames[slot] = pixels

    def forget(self, slot: int) -> None:
        self._frames[slot] = None

    def view(self, slot: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        if not 0 <= slot < self.slots:
            raise ShmError(f"slot {slot} out of range [0, {self.slots})")
        frame = self._frames[slot]
        if frame is None or frame.shape != tuple(shape) or frame.dtype != np.dtype(dtype):
            raise ShmError(f"slot {slot} does not hold a {tuple(shape)} {dtype} frame")
        return frame


class LocalIngest(Ingest):
    """``Ingest`` whose frames stay where they were received (``LocalSlots``) and whose descriptors and
    records go to callables (``attach_local``)."""

    def __init__(self, cfg: DaemonConfig, slots: LocalSlots, ctx: zmq.Context, curve=None):
        super().__init__(cfg, slots, ctx, local=True, curve=curve)

    def _store(self, frame: FrameIn, slot: int) -> tuple[tuple[int, ...], str]:
        mf = self.cfg.max_frame
        pixels = decode_frame(frame, mf.width, mf.height, self.ring.slot_bytes)
        self.ring.keep(slot, pixels)
        return pixels.shape, pixels.dtype.name

    def _release(self, slot: int) -> None:
        super()._release(slot)
        self.ring.forget(slot)


def _merge(snapshots: list[dict]) -> dict:
    """One snapshot from several registries (their metric names are disjoint)."""
    return {key: [item for snap in snapshots for item in snap.get(key, [])] for key in ("counters", "gauges",
                                                                                          "hists")}


class SingleProcess:
    def __init__(self, cfg: DaemonConfig, engine, ctx: zmq.Context):
        self.cfg, self.engine = cfg, engine
        self.logger = get_logger()
        c = cfg.curve
        self.curve = None
        if c is not None and (c.on_ingest or c.on_output):  # one ZAP authenticator for both
            self.curve = CurveServer(ctx, c.server_secret, c.clients_dir)
        self.publisher = Publisher(cfg, ctx, local=True, curve=self.curve)
        self.slots = LocalSlots(cfg.queue.slots, cfg.max_frame.nbytes)
        self.ingest = LocalIngest(cfg, self.slots, ctx, curve=self.curve)
        self.metrics = Metrics()
        self.inspector = FrameInspector(cfg, self.slots, engine, self.metrics, self.publisher.on_message)
        self.ingest.attach_local(self.inspector.add, self.publisher.on_message)
        credit = cfg.queue.worker_credit  # the worker's hello: it is warm (the engine was opened warm)
        self.ingest.on_control({"t": "hello", "worker": 0, "gen": _GEN, "credit": credit})
        self.stats = make_socket(ctx, zmq.PUSH, sndhwm=100)
        self.stats.connect(ipc_endpoint(cfg.runtime_path, "stats.ipc"))

    def close(self) -> None:
        self.ingest.close()
        self.publisher.close()
        close_socket(self.stats, linger_ms=2000)
        if self.curve is not None:
            self.curve.stop()

    # ---- one loop -----------------------------------------------------------------------------------------
    def _hand_back(self) -> None:
        """Slots of answered frames back to ingest (credit returns), then hand it waiting frames."""
        released = self.inspector.take_released()
        if released:
            self.ingest.on_control({"t": "done", "worker": 0, "gen": _GEN, "slots": released})
            self.ingest.dispatch()

    def snapshot(self) -> dict:
        gpu_memory(self.engine, self.metrics, 0)
        return _merge([self.ingest.snapshot(), self.metrics.snapshot(), self.publisher.metrics.snapshot()])

    def _send_stats(self) -> None:
        try:
            send_msg(self.stats, {"t": "stats", "source": SOURCE, "snapshot": self.snapshot()}, zmq.NOBLOCK)
        except zmq.Again:  # supervisor busy: the next snapshot carries the same counters
            pass

    def step(self, idle_wait_ms: int = 50) -> None:
        """Receive (each frame tiled as it is read), advance the engine batches, publish what finished."""
        busy = self.inspector.pending > 0
        self.ingest.step(0 if busy else idle_wait_ms)
        if self.inspector.pending:
            self.inspector.poll(0.001)
        self._hand_back()

    def run(self, should_exit) -> None:
        self._send_stats()  # every counter, at 0, is in /metrics before the daemon says it is ready
        send_msg(self.stats, {"t": "ready", "source": SOURCE, "worker": 0, "gen": _GEN})
        last_stats = time.monotonic()
        ingest = self.ingest
        while not should_exit():
            self.step()
            now = time.monotonic()
            if now - last_stats >= 0.5:
                self._send_stats()
                last_stats = now
            if ingest.stopping_until is not None and (ingest.drained or now > ingest.stopping_until):
                if not ingest.drained:
                    ingest.abandon("not processed before the shutdown timeout")
                self._finish()
                return
        self.inspector.drain(self.cfg.shutdown_timeout_s / 2)  # SIGTERM without a stop command
        self._hand_back()
        self._send_stats()

    def _finish(self) -> None:
        """Everything received has its record published (calls, not messages): report both counts."""
        self._send_stats()
        send_msg(self.stats, {"t": "drained", "received": self.ingest.received})
        send_msg(self.stats, {"t": "published", "count": self.publisher.published})
        log(self.logger, "ingest.drained", received=self.ingest.received)
        log(self.logger, "publisher.stopped", published=self.publisher.published)


def run_single(cfg: DaemonConfig, should_exit) -> int:
    logger = get_logger()
    engine = open_worker_engine(cfg, logger, worker=0, gen=_GEN)
    ctx = zmq.Context()
    single = SingleProcess(cfg, engine, ctx)
    log(logger, "single.started", endpoint=cfg.endpoints.ingest, output=cfg.endpoints.output)
    try:
        single.run(should_exit)
    except Exception:
        log(logger, "single.crashed", logging.ERROR, exc_info=True)
        raise
    finally:
        single.close()
        ctx.term()
        engine.close()
    return 0
