"""Inference worker: descriptors -> shared-memory frame views -> TileBatcher (tiler, engine, fusion,
verdict) -> records to the publisher; slot ids and credit back to ingest.

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

__all__ = ["CountingEngine", "Worker", "run_worker", "downscale_map", "inspect_configs", "check_tiling"]


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


def inspect_configs(cfg: DaemonConfig) -> dict:
    """camera id -> InspectConfig (key None: cameras not listed). ValueError names the key."""
    from .pipeline import InspectConfig

    out = {None: InspectConfig.from_mapping(camera_inspection_mapping(cfg, ""), "inspection")}
    for i, cam in enumerate(cfg.cameras):
        out[cam.id] = InspectConfig.from_mapping(
            camera_inspection_mapping(cfg, cam.id), f"cameras[{i}]+inspection"
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
    """Block-mean down-scaling by an integer factor (edges padded by repetition); float32."""
    m = np.asarray(anomaly_map, dtype=np.float32)
    if factor <= 1:
        return m
    h, w = -(-m.shape[0] // factor) * factor, -(-m.shape[1] // factor) * factor
    m = np.pad(m, ((0, h - m.shape[0]), (0, w - m.shape[1])), mode="edge")
    return m.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3)).astype(np.float32)


def _regions(regions) -> list[dict]:
    return [asdict(r) if is_dataclass(r) else dict(r) for r in regions]


class Worker:
    def __init__(self, cfg: DaemonConfig, index: int, gen: int, ring: SlotRing, engine, ctx: zmq.Context):
        from .batcher import TileBatcher

        self.cfg, self.index, self.gen, self.ring = cfg, index, gen, ring
        self.metrics = Metrics()
        self.engine = engine
        self.model_id = engine.meta.model_id
        self.batcher = TileBatcher(
            CountingEngine(engine, self.metrics), cfg.engine.max_batch, cfg.engine.max_delay_us
        )
        self.configs = inspect_configs(cfg)
        self.tickets: dict[int, dict] = {}
        self._next_ticket = 0
        self._released: list[int] = []
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

    def close(self) -> None:
        for sock in (self.work,):
            close_socket(sock)
        for sock in (self.ctl, self.rec, self.stats):
            close_socket(sock, linger_ms=2000)

    # ---- frames -----------------------------------------------------------------------------------------
    def on_descriptor(self, desc: dict) -> None:
        if desc.get("gen") != self.gen:
            return  # meant for a previous generation: ingest has accounted for it
        now = time.time_ns()
        desc["picked_ns"] = now
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
                small = downscale_map(outcome.anomaly_map, self.cfg.map_downscale)
                msg["map"] = {"shape": list(small.shape), "dtype": "float32", "data": small.tobytes()}
            for stage, ms in timings.items():
                self.metrics.observe("edge_stage_latency_ms", ms, {"stage": stage})
        send_msg(self.rec, msg)
        self._released.append(desc["slot"])

    def on_results(self, results) -> None:
        for ticket, outcome in results:
            self._publish(self.tickets.pop(ticket), outcome)

    def flush_released(self) -> None:
        if self._released:
            send_msg(self.ctl, {"t": "done", "worker": self.index, "gen": self.gen, "slots": self._released})
            self._released = []

    # ---- loop -------------------------------------------------------------------------------------------
    def _send_stats(self) -> None:
        self._gpu_memory()
        try:
            send_msg(
                self.stats,
                {"t": "stats", "source": self.source, "snapshot": self.metrics.snapshot()},
                zmq.NOBLOCK,
            )
        except zmq.Again:
            pass

    def _gpu_memory(self) -> None:
        if not str(getattr(self.engine, "device", "cpu")).startswith("cuda"):
            return
        import torch

        self.metrics.set("edge_gpu_memory_bytes", torch.cuda.memory_allocated(), {"worker": str(self.index)})

    def run(self, should_exit) -> None:
        send_msg(
            self.ctl,
            {"t": "hello", "worker": self.index, "gen": self.gen, "credit": self.cfg.queue.worker_credit},
        )
        send_msg(self.stats, {"t": "ready", "source": self.source, "worker": self.index, "gen": self.gen})
        last_stats = 0.0
        while not should_exit():
            busy = self.batcher.pending_frames > 0
            if self.work.poll(0 if busy else 50, zmq.POLLIN):
                for _ in range(256):
                    try:
                        self.on_descriptor(recv_msg(self.work, zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self.batcher.pending_frames:
                self.on_results(self.batcher.poll(0.001))
            self.flush_released()
            if time.monotonic() - last_stats >= 0.5:
                self._send_stats()
                last_stats = time.monotonic()
        self.on_results(self.batcher.drain(self.cfg.shutdown_timeout_s / 2))
        self.flush_released()
        self._send_stats()


def run_worker(cfg: DaemonConfig, index: int, gen: int, ring_name: str, slot_bytes: int, should_exit) -> int:
    from engines.registry import open_engine

    logger = get_logger()
    ring = SlotRing.attach(ring_name, cfg.queue.slots, slot_bytes)
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
    )
    engine.warmup()
    log(
        logger,
        "worker.warm",
        worker=index,
        gen=gen,
        backend=engine.backend,
        device=engine.device,
        precision=engine.precision,
        model=engine.meta.model_id,
        seconds=round(time.monotonic() - start, 3),
    )
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
