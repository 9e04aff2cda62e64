"""The daemon's ingest and publisher in this process, a stand-in worker and a raw subscriber: deterministic
tests of what a peer can do to the frame path, without starting processes.

``InProcessDaemon`` builds the real ``Ingest`` and ``Publisher`` objects (real sockets: the camera endpoint
on tcp, or inproc for bursts that must be in the socket at once), a stand-in worker that answers every
descriptor with a PASS verdict (and a small map) through the publisher like the real one, and a SUB socket
on the output that subscribes to everything. ``pump`` runs one loop step of each until a condition holds.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid

import msgpack
import numpy as np
import zmq

from edge_daemon.config import config_from_mapping
from edge_daemon.ingest import Ingest
from edge_daemon.metrics import Aggregator
from edge_daemon.protocol import encode_header, make_record
from edge_daemon.publisher import Publisher
from edge_daemon.shm import SlotRing
from edge_daemon.transport import free_tcp_port, ipc_endpoint, recv_msg, send_msg

__all__ = ["InProcessDaemon", "raw_frame"]


def raw_frame(camera_id: str, frame_id: int, h: int = 8, w: int = 8) -> list[bytes]:
    return [encode_header(camera_id, frame_id, 1, "mono8", w, h, 1), bytes(h * w)]


def _sock(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


class InProcessDaemon:
    def __init__(
        self,
        *,
        cameras=("cam1", "cam2"),
        queue: dict | None = None,
        max_frame: tuple[int, int, int] = (64, 64, 3),
        transport: str = "tcp",
        imagezmq: bool = False,
        maps: bool = True,
        credit: int = 8,
    ):
        instance = f"h{uuid.uuid4().hex[:8]}"
        self.run_dir = tempfile.mkdtemp(prefix="eh-", dir="/tmp")  # short: ipc paths must stay < 100 chars
        run_dir = self.run_dir
        self.ctx = zmq.Context()
        endpoint = (
            f"tcp://127.0.0.1:{free_tcp_port()}" if transport == "tcp" else f"inproc://frames-{instance}"
        )
        endpoints = {"ingest": endpoint, "output": f"inproc://out-{instance}", "metrics_port": None}
        if imagezmq:
            endpoints["imagezmq"] = f"tcp://127.0.0.1:{free_tcp_port()}"
        w, h, c = max_frame
        self.cfg = config_from_mapping(
            {
                "engine": {"bundle": "unused"},
                "endpoints": endpoints,
                "max_frame": {"width": w, "height": h, "channels": c},
                "queue": queue or {"slots": 24, "size": 8, "worker_credit": credit},
                "runtime_dir": str(run_dir),
                "instance": instance,
                "cameras": [{"id": cam} for cam in cameras],
            }
        )
        self.maps = maps
        self.ring = SlotRing.create(instance, self.cfg.queue.slots, self.cfg.max_frame.nbytes)
        rt = self.cfg.runtime_path
        self.stats = _sock(self.ctx, zmq.PULL)
        self.stats.bind(ipc_endpoint(rt, "stats.ipc"))
        self.publisher = Publisher(self.cfg, self.ctx)
        self.sub = _sock(self.ctx, zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.cfg.endpoints.output)
        self.ingest = Ingest(self.cfg, self.ring, self.ctx)
        self.work = _sock(self.ctx, zmq.PULL)
        self.work.connect(ipc_endpoint(rt, "work-0.ipc"))
        self.ctl = _sock(self.ctx, zmq.PUSH)
        self.ctl.connect(ipc_endpoint(rt, "ingest.ipc"))
        self.rec = _sock(self.ctx, zmq.PUSH)
        self.rec.connect(ipc_endpoint(rt, "publisher.ipc"))
        self.descriptors: list[dict] = []
        self.messages: list[tuple[bytes, dict]] = []  # (topic, body) as published, in order
        self._subscribe()
        send_msg(self.ctl, {"t": "hello", "worker": 0, "gen": 1, "credit": credit})
        self.pump(lambda: all(s is not None for s in self.ingest.workers.values()), what="worker hello")
        self.camera = self.connect()

    # ---- plumbing ---------------------------------------------------------------------------------------
    def _subscribe(self) -> None:
        """PUB/SUB joins asynchronously: probe the output directly until the subscriber sees a probe."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.publisher.out.send_multipart([b"\x00probe", b""])
            if self.sub.poll(20):
                break
        while self.sub.poll(50):
            self.sub.recv_multipart()

    def connect(self, endpoint: str | None = None, kind: int = zmq.PUSH) -> zmq.Socket:
        """A camera socket connected to the frames endpoint (or ``endpoint``); closed with the harness."""
        sock = _sock(self.ctx, kind)
        sock.setsockopt(zmq.SNDHWM, 100000)
        sock.connect(endpoint or self.cfg.endpoints.ingest)
        self._cameras = [*getattr(self, "_cameras", []), sock]
        return sock

    def step(self) -> None:
        """One loop iteration of ingest, the stand-in worker and the publisher; collect what is published."""
        self.ingest.step(0)
        while self.work.poll(0):
            self._answer(recv_msg(self.work))
        self.publisher.step(0)
        while self.sub.poll(0):
            topic, *rest = self.sub.recv_multipart()
            if topic != b"\x00probe":
                self.messages.append((topic, msgpack.unpackb(rest[0], raw=False) if rest else None))
        while self.stats.poll(0):
            self.stats.recv()

    def _answer(self, desc: dict) -> None:
        """The stand-in worker: read the slot, publish a PASS verdict (and a 2x2 map), give the slot back."""
        self.descriptors.append(desc)
        frame = self.ring.view(desc["slot"], tuple(desc["shape"]), desc["dtype"])
        assert frame.shape[:2] == tuple(desc["shape"][:2])
        record = make_record(
            "verdict",
            desc["camera_id"],
            desc["frame_id"],
            capture_ns=desc["capture_ns"],
            receive_ns=desc["receive_ns"],
            verdict="PASS",
            score=0.0,
            threshold=1.0,
        )
        msg = {"t": "rec", "record": record}
        if self.maps:
            small = np.arange(4, dtype="<f4").reshape(2, 2)
            msg["map"] = {"shape": [2, 2], "dtype": "float32", "data": small.tobytes()}
        send_msg(self.rec, msg)
        send_msg(self.ctl, {"t": "done", "worker": 0, "gen": desc["gen"], "slots": [desc["slot"]]})

    def pump(self, until, timeout_s: float = 10.0, what: str = "condition"):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.step()
            value = until()
            if value:
                return value
            time.sleep(0.001)
        raise TimeoutError(f"{what} not reached within {timeout_s:g} s")

    def settle(self, quiet_s: float = 0.2) -> None:
        """Pump until nothing was published for ``quiet_s``."""
        last, n = time.monotonic(), len(self.messages)
        while time.monotonic() - last < quiet_s:
            self.step()
            if len(self.messages) != n:
                last, n = time.monotonic(), len(self.messages)
            time.sleep(0.002)

    # ---- what came out ----------------------------------------------------------------------------------
    def records(self) -> list[tuple[str, dict]]:
        return [(t.decode(errors="replace"), b) for t, b in self.messages if not t.endswith(b"/map")]

    def counters(self) -> dict:
        """Counters of ingest + publisher summed like the supervisor does: {(name, labels tuple): value}."""
        agg = Aggregator()
        agg.update("ingest", self.ingest.snapshot())
        agg.update("publisher", self.publisher.metrics.snapshot())
        return agg.totals().counters

    def close(self) -> None:
        self.ingest.close()
        self.publisher.close()
        for sock in (self.stats, self.sub, self.work, self.ctl, self.rec, *getattr(self, "_cameras", [])):
            sock.close(linger=0)
        self.ctx.term()
        self.ring.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
