"""Inference worker: descriptors -> shared-memory frame views -> TileBatcher (tiler, engine, fusion,
verdict) -> records to the publisher; slot ids and credit back to ingest.

``FrameInspector`` is that work without sockets (also run by the single-process mode, single.py);
``Worker`` is the process around it.

Sockets
  work   PULL connect ipc ``work-<i>.ipc`` (ingest): descriptors of this worker's generation
  ctl    PUSH connect ipc ``ingest.ipc``: ``hello`` (generation, credit) once warm, ``done`` (slot ids)
  rec    PUSH connect ipc ``publisher.ipc``: one record per frame (+ optional down-scaled map)
  stats  PUSH connect ipc ``stats.ipc`` (supervisor): ``ready``, metric snapshots (also the heartbeat)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, is_dataclass

import numpy as np
import zmq

from .config import DaemonConfig, camera_inspection_mapping
from .logs import get_logger, log
from .metrics import BATCH_BUCKETS, Metrics
from .protocol import make_record
from .shm import SlotRing
from .transport import close_socket, ipc_endpoint, make_socket, recv_msg, send_msg

__all__ = [
    "CountingEngine",
    "FrameInspector",
    "Worker",
    "run_worker",
    "open_worker_engine",
    "gpu_memory",
    "downscale_map",
    "MapDownscaler",
    "inspect_configs",
    "check_tiling",
]


class CountingEngine:
    """Delegates to an engine and records every batch size in a histogram."""

    def __init__(self, engine, metrics: Metrics):
        self._engine, self._metrics = engine, metrics

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @property
    def input_shape(self):
        return self._engine.input_shape

    @property
    def map_shape(self):
        return self._engine.map_shape

    def infer(self, tiles):
        self._metrics.observe("edge_batch_size", len(tiles), buckets=BATCH_BUCKETS)
        return self._engine.infer(tiles)

    def submit(self, tiles, slot: int = 0):
        self._metrics.observe("edge_batch_size", len(tiles), buckets=BATCH_BUCKETS)
        return self._engine.submit(tiles, slot)


def bundle_scoring(meta) -> dict:
    """The inspection settings the bundle's thresholds were calibrated with (bundle.json calibration.scoring):
    the defaults under the config's own inspection keys, so an unset key keeps the threshold valid."""
    from inspection.pipeline import SCORING_KEYS

    recorded = (getattr(meta, "calibration", None) or {}).get("scoring") or {}
    return {k: v for k, v in recorded.items() if k in SCORING_KEYS}


def inspect_configs(cfg: DaemonConfig, meta=None) -> dict:
    """camera id -> InspectConfig (key None: cameras not listed). ValueError names the key. With the bundle's
    ``meta``, its calibrated scoring settings are the defaults that the config overrides."""
    from inspection.pipeline import InspectConfig

    base = bundle_scoring(meta) if meta is not None else {}
    out = {None: InspectConfig.from_mapping({**base, **camera_inspection_mapping(cfg, "")}, "inspection")}
    for i, cam in enumerate(cfg.cameras):
        out[cam.id] = InspectConfig.from_mapping(
            {**base, **camera_inspection_mapping(cfg, cam.id)}, f"cameras[{i}]+inspection"
        )
    return out


def check_tiling(configs: dict, meta) -> None:
    """Refuse tile overlaps the bundle's tile size and stride cannot give (every frame would fail)."""
    tile, stride = min(meta.input.height, meta.input.width), meta.map.stride
    for camera, config in configs.items():
        if not 0 <= config.tile_overlap <= tile - stride:
            where = "inspection" if camera is None else f"camera {camera}"
            raise ValueError(
                f"{where}: tile_overlap {config.tile_overlap} is impossible with the bundle's "
                f"{meta.input.height}x{meta.input.width} tiles at stride {stride}: "
                f"must be in 0..{tile - stride}"
            )


def downscale_map(anomaly_map: np.ndarray, factor: int) -> np.ndarray:
    """Block-mean down-scaling by an integer factor (edges padded by repetition); float32. The reference
    for ``MapDownscaler``, which computes the same with OpenCV."""
    m = np.asarray(anomaly_map, dtype=np.float32)
    if factor <= 1:
        return m
    h, w = -(-m.shape[0] // factor) * factor, -(-m.shape[1] // factor) * factor
    m = np.pad(m, ((0, h - m.shape[0]), (0, w - m.shape[1])), mode="edge")
    return m.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3)).astype(np.float32)


class MapDownscaler:
    """``downscale_map`` for the hot path: OpenCV's area resize (a block mean for integer factors) on the
    map, after an edge-replicating pad into a buffer kept per map shape when the size is not a multiple
    of the factor. Returns a new small float32 array (it leaves with the record)."""

    def __init__(self, factor: int):
        self.factor = factor
        self._pads: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, anomaly_map: np.ndarray) -> np.ndarray:
        import cv2

        f = self.factor
        m = np.asarray(anomaly_map, dtype=np.float32)
        if f <= 1:
            return m
        h, w = m.shape
        hp, wp = -(-h // f) * f, -(-w // f) * f
        if (hp, wp) != (h, w):
            pad = self._pads.get((h, w))
            if pad is None:
                pad = self._pads[(h, w)] = np.empty((hp, wp), dtype=np.float32)
            cv2.copyMakeBorder(m, 0, hp - h, 0, wp - w, cv2.BORDER_REPLICATE, dst=pad)
            m = pad
        return cv2.resize(m, (wp // f, hp // f), interpolation=cv2.INTER_AREA)


def _regions(regions) -> list[dict]:
    return [asdict(r) if is_dataclass(r) else dict(r) for r in regions]


class FrameInspector:
    """The worker's work without its sockets: descriptors in, one record message out per frame.

    ``add(desc)`` views the frame in its slot and hands it to the ``TileBatcher`` (tiles are copied out at
    once); ``poll``/``drain`` advance the batcher and hand each finished frame's record message (``{"t":
    "rec", "record", "map"?}``) to ``emit``; the slot ids of answered frames collect in ``released`` until
    the owner hands them back to ingest. Used by the worker process and by the single-process mode."""

    def __init__(self, cfg: DaemonConfig, ring, engine, metrics: Metrics, emit):
        from inspection.batcher import TileBatcher

        self.cfg, self.ring, self.engine, self.metrics, self.emit = cfg, ring, engine, metrics, emit
        self.model_id = engine.meta.model_id
        self.batcher = TileBatcher(
            CountingEngine(engine, metrics), cfg.engine.max_batch, cfg.engine.max_delay_us
        )
        self.configs = inspect_configs(cfg, engine.meta)
        self.tickets: dict[int, dict] = {}
        self._next_ticket = 0
        self.released: list[int] = []
        self._downscale = MapDownscaler(cfg.map_downscale)

    @property
    def pending(self) -> int:
        return self.batcher.pending_frames

    def add(self, desc: dict) -> None:
        desc["picked_ns"] = time.time_ns()
        ticket = self._next_ticket
        self._next_ticket += 1
        try:
            frame = self.ring.view(desc["slot"], tuple(desc["shape"]), desc["dtype"])
            config = self.configs.get(desc["camera_id"], self.configs[None])
            self.batcher.add(ticket, desc["camera_id"], frame, config)
        except Exception as exc:  # noqa: BLE001 - a frame the pipeline refuses costs one error record
            self._publish(desc, exc)
            return
        self.tickets[ticket] = desc

    def poll(self, timeout_s: float) -> None:
        for ticket, outcome in self.batcher.poll(timeout_s):
            self._publish(self.tickets.pop(ticket), outcome)

    def drain(self, timeout_s: float) -> None:
        for ticket, outcome in self.batcher.drain(timeout_s):
            self._publish(self.tickets.pop(ticket), outcome)

    def take_released(self) -> list[int]:
        out, self.released = self.released, []
        return out

    def _publish(self, desc: dict, outcome) -> None:
        end = time.time_ns()
        timings = {"queue": (desc["picked_ns"] - desc["receive_ns"]) / 1e6}
        common = dict(capture_ns=desc["capture_ns"], receive_ns=desc["receive_ns"], model_id=self.model_id)
        cam = desc["camera_id"]
        if isinstance(outcome, Exception):
            timings["total"] = (end - desc["receive_ns"]) / 1e6
            record = make_record(
                "error",
                cam,
                desc["frame_id"],
                reason=f"{type(outcome).__name__}: {outcome}",
                timings_ms=timings,
                **common,
            )
            msg = {"t": "rec", "record": record}
        else:
            timings.update(outcome.timings_ms)
            timings["total"] = (end - desc["receive_ns"]) / 1e6
            record = make_record(
                "verdict",
                cam,
                desc["frame_id"],
                verdict=outcome.verdict,
                reason=outcome.reason,
                score=outcome.score,
                threshold=outcome.threshold,
                regions=_regions(outcome.regions),
                timings_ms=timings,
                **common,
            )
            msg = {"t": "rec", "record": record}
            if self.cfg.map_downscale:
                small = self._downscale(outcome.anomaly_map)
                msg["map"] = {"shape": list(small.shape), "dtype": "float32", "data": small.tobytes()}
            for stage, ms in timings.items():
                self.metrics.observe("edge_stage_latency_ms", ms, {"stage": stage})
        self.emit(msg)
        self.released.append(desc["slot"])


class Worker:
    """The worker process: a ``FrameInspector`` between its sockets (see the module docstring)."""

    def __init__(self, cfg: DaemonConfig, index: int, gen: int, ring: SlotRing, engine, ctx: zmq.Context):
        self.cfg, self.index, self.gen, self.ring = cfg, index, gen, ring
        self.metrics = Metrics()
        self.engine = engine
        self.logger = get_logger()
        rt = cfg.runtime_path
        self.work = make_socket(ctx, zmq.PULL)
        self.work.connect(ipc_endpoint(rt, f"work-{index}.ipc"))
        self.ctl = make_socket(ctx, zmq.PUSH)
        self.ctl.connect(ipc_endpoint(rt, "ingest.ipc"))
        self.rec = make_socket(ctx, zmq.PUSH, sndhwm=0)
        self.rec.connect(ipc_endpoint(rt, "publisher.ipc"))
        self.stats = make_socket(ctx, zmq.PUSH, sndhwm=100)
        self.stats.connect(ipc_endpoint(rt, "stats.ipc"))
        self.source = f"worker-{index}-g{gen}"
        self.inspector = FrameInspector(cfg, ring, engine, self.metrics, lambda msg: send_msg(self.rec, msg))

    def close(self) -> None:
        for sock in (self.work,):
            close_socket(sock)
        for sock in (self.ctl, self.rec, self.stats):
            close_socket(sock, linger_ms=2000)

    # ---- frames -----------------------------------------------------------------------------------------
    def on_descriptor(self, desc: dict) -> None:
        if desc.get("gen") != self.gen:
            return  # meant for a previous generation: ingest has accounted for it
        self.inspector.add(desc)

    def flush_released(self) -> None:
        released = self.inspector.take_released()
        if released:
            send_msg(self.ctl, {"t": "done", "worker": self.index, "gen": self.gen, "slots": released})

    # ---- loop -------------------------------------------------------------------------------------------
    def _send_stats(self) -> None:
        gpu_memory(self.engine, self.metrics, self.index)
        try:
            send_msg(
                self.stats,
                {"t": "stats", "source": self.source, "snapshot": self.metrics.snapshot()},
                zmq.NOBLOCK,
            )
        except zmq.Again:
            pass

    def run(self, should_exit) -> None:
        send_msg(
            self.ctl,
            {"t": "hello", "worker": self.index, "gen": self.gen, "credit": self.cfg.queue.worker_credit},
        )
        send_msg(self.stats, {"t": "ready", "source": self.source, "worker": self.index, "gen": self.gen})
        last_stats = 0.0
        inspector = self.inspector
        while not should_exit():
            busy = inspector.pending > 0
            if self.work.poll(0 if busy else 50, zmq.POLLIN):
                for _ in range(256):
                    try:
                        self.on_descriptor(recv_msg(self.work, zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if inspector.pending:
                inspector.poll(0.001)
            self.flush_released()
            if time.monotonic() - last_stats >= 0.5:
                self._send_stats()
                last_stats = time.monotonic()
        inspector.drain(self.cfg.shutdown_timeout_s / 2)
        self.flush_released()
        self._send_stats()


def gpu_memory(engine, metrics: Metrics, index: int) -> None:
    """edge_gpu_memory_bytes of a torch engine on CUDA (nothing on CPU engines)."""
    if not str(getattr(engine, "device", "cpu")).startswith("cuda"):
        return
    import torch

    metrics.set("edge_gpu_memory_bytes", torch.cuda.memory_allocated(), {"worker": str(index)})


def open_worker_engine(cfg: DaemonConfig, logger, **fields):
    """The configured engine, opened and warmed (every batch bucket run once); logs ``worker.warm``."""
    from engines.registry import open_engine

    e = cfg.engine
    start = time.monotonic()
    engine = open_engine(
        e.bundle,
        backend=e.backend,
        device=e.device,
        precision=e.precision,
        streams=e.streams,
        max_batch=e.max_batch,
        threads=e.threads,
        cache_dir=e.cache_dir,
        **e.backend_options(),
    )
    engine.warmup()
    log(
        logger,
        "worker.warm",
        **fields,
        backend=engine.backend,
        device=engine.device,
        precision=engine.precision,
        model=engine.meta.model_id,
        seconds=round(time.monotonic() - start, 3),
    )
    return engine


def run_worker(cfg: DaemonConfig, index: int, gen: int, ring_name: str, slot_bytes: int, should_exit) -> int:
    logger = get_logger()
    ring = SlotRing.attach(ring_name, cfg.queue.slots, slot_bytes)
    engine = open_worker_engine(cfg, logger, worker=index, gen=gen)
    ctx = zmq.Context()
    worker = Worker(cfg, index, gen, ring, engine, ctx)
    try:
        worker.run(should_exit)
    except Exception:
        log(logger, "worker.crashed", logging.ERROR, exc_info=True, worker=index)
        raise
    finally:
        worker.close()
        ctx.term()
        engine.close()
        ring.close()
    return 0
