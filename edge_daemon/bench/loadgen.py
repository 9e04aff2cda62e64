"""Load generation against the real daemon: the daemon as a subprocess, simulated cameras that publish at a
fixed rate from their own processes (open loop), and a collector of the verdict stream.

Clocks: a frame's capture stamp is the camera's ``time.time_ns()`` just before the send (header
``timestamp_ns``, echoed as the record's ``capture_ns``); its receipt is the collector's ``time.time_ns()``
when the record is read. Same machine, same clock. Schedules use ``time.monotonic()`` (CLOCK_MONOTONIC is
system-wide on Linux, so an absolute start time can be handed to another process).

Open loop: camera k sends frame i at ``start + i / fps`` whatever the daemon does; a frame the transport
does not take at once (the PUSH high-water mark is full) is counted as ``refused`` and not retried, so the
send schedule never waits for the daemon. Every frame that was sent must come back as exactly one record
(verdict, error or drop); what has not come back after the grace period is ``unanswered``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

__all__ = ["CameraPlan", "CameraReport", "Receipt", "DaemonProcess", "VerdictCollector", "bench_config",
           "TRANSPORTS", "local_endpoint", "run_cameras", "latency_stats", "handshake", "synthetic_frames",
           "WARMUP_BASE"]

WARMUP_BASE = 1 << 40  # frame ids of hand-shake / warm-up frames start here (never counted)


# ---- the daemon --------------------------------------------------------------------------------------------


TRANSPORTS = ("tcp", "ipc")


def local_endpoint(endpoint: str) -> str:
    """A bind endpoint as a client connects to it: ``tcp://*:5555`` -> ``tcp://127.0.0.1:5555``."""
    return endpoint.replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:", "://127.0.0.1:")


def bench_config(base: dict, workdir: Path, cameras: list[str], frame_wh: tuple[int, int], channels: int = 1,
                 bundle: str | None = None, base_dir: Path | None = None, transport: str = "tcp",
                 process_mode: str | None = None) -> tuple[Path, dict]:
    """A copy of the daemon config ``base`` for a local benchmark run, written to ``workdir/daemon.yaml``.

    Changed: local endpoints (``transport`` tcp: loopback on free ports; ipc: unix sockets in the runtime
    dir) for frames and verdicts, a unique instance and runtime dir, max_frame at least the benchmark
    frame, the camera list (per-camera settings of ``base`` kept for ids it names), engine.bundle made
    absolute (a relative one is relative to ``base_dir``, default the current directory), and
    ``process_mode`` when given. Engine, workers, queue and inspection settings are kept as they are."""
    from edge_daemon.transport import free_tcp_port

    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    data = yaml.safe_load(yaml.safe_dump(base))  # deep copy of plain data
    instance = f"bench{uuid.uuid4().hex[:8]}"
    runtime = Path(tempfile.gettempdir()) / f"ei-{instance}"
    engine = dict(data.get("engine") or {})
    if bundle:
        engine["bundle"] = str(bundle)
    if "bundle" in engine and not Path(engine["bundle"]).is_absolute():
        engine["bundle"] = str((Path(base_dir or Path.cwd()) / engine["bundle"]).resolve())
    data["engine"] = engine
    if transport == "ipc":
        # named *.ipc: the daemon removes those files (and its runtime dir) when it stops
        ingest, output = f"ipc://{runtime / 'frames.ipc'}", f"ipc://{runtime / 'verdicts.ipc'}"
    else:
        ingest, output = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    data["endpoints"] = {
        **(data.get("endpoints") or {}),
        "ingest": ingest,
        "output": output,
        "metrics_port": free_tcp_port(),
        "metrics_host": "127.0.0.1",
    }
    data["endpoints"].pop("imagezmq", None)
    data["endpoints"].pop("ingest_mode", None)
    mf = dict(data.get("max_frame") or {})
    data["max_frame"] = {
        "width": max(int(mf.get("width", 0)), frame_wh[0]),
        "height": max(int(mf.get("height", 0)), frame_wh[1]),
        "channels": max(int(mf.get("channels", 1)), channels),
        "bytes_per_sample": int(mf.get("bytes_per_sample", 1)),
    }
    known = {c["id"]: c for c in data.get("cameras") or [] if isinstance(c, dict) and "id" in c}
    data["cameras"] = [known.get(cam, {"id": cam}) for cam in cameras]
    data["instance"] = instance
    data["runtime_dir"] = str(runtime)  # the daemon removes it
    if process_mode is not None:
        data["process_mode"] = process_mode
    data.pop("curve", None)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "daemon.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, data


class DaemonProcess:
    """``python -m edge_daemon run --config C`` in its own process group, logs to a file.

    ``stop()``: SIGTERM, wait (the daemon drains), then SIGKILL the group; always call it (finally)."""

    def __init__(self, config: Path, log_path: Path, metrics_port: int | None):
        self.log_path, self.metrics_port = Path(log_path), metrics_port
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("EDGE_INSPECT_QUICK", None)  # the caller stops this daemon, not the quick switch
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_daemon", "run", "--config", str(config)],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def logs(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def healthy(self) -> bool:
        if self.metrics_port is None:
            return self.proc.poll() is None
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/healthz"
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                return resp.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Seconds until /healthz answers 200; RuntimeError if the daemon exits or does not get ready."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with code {self.proc.returncode}:\n{self.logs()}")
            if self.healthy():
                return time.monotonic() - start
            time.sleep(0.1)
        raise RuntimeError(f"daemon not healthy within {timeout_s:g} s:\n{self.logs()}")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait up to timeout_s, then SIGKILL the process group. Returns the exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
        finally:
            self._log.close()
        return self.proc.returncode


# ---- the verdict stream ------------------------------------------------------------------------------------


def latency_stats(values) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max/mean of latencies in ms (None each when there are none)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    keys = ("p50", "p90", "p99", "p99.9", "max", "mean")
    if v.size == 0:
        return dict.fromkeys(keys)
    q = np.percentile(v, [50, 90, 99, 99.9])
    return dict(zip(keys, [*map(float, q), float(v.max()), float(v.mean())], strict=True))


@dataclass(frozen=True)
class Receipt:
    """One record as the subscriber saw it."""

    camera_id: str
    frame_id: int | None
    kind: str
    recv_ns: int
    capture_ns: int | None
    verdict: str | None = None
    score: float | None = None
    threshold: float | None = None
    timings_ms: dict = field(default_factory=dict)
    reason: str = ""
    regions: tuple = ()  # the record's defect regions (dicts x, y, w, h, area, peak, mean)

    @property
    def latency_ms(self) -> float | None:
        return None if self.capture_ns is None else (self.recv_ns - self.capture_ns) / 1e6


class VerdictCollector:
    """A thread that reads the verdict stream into a list of Receipts (and anomaly maps when asked)."""

    def __init__(self, endpoint: str, maps: bool = False, keep_maps: int = 0):
        from edge_daemon.client import VerdictSubscriber

        self._sub = VerdictSubscriber(endpoint, maps=maps)
        self.receipts: list[Receipt] = []
        self.maps: dict[tuple[str, int], np.ndarray] = {}
        self.keep_maps = keep_maps
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="verdict-collector", daemon=True)

    def start(self) -> VerdictCollector:
        self._thread.start()
        return self

    def _run(self) -> None:
        from edge_daemon.client import AnomalyMap

        while not self._stop.is_set():
            item = self._sub.recv(0.1)
            now = time.time_ns()
            if item is None:
                continue
            if isinstance(item, AnomalyMap):
                if len(self.maps) < self.keep_maps or self.keep_maps < 0:
                    self.maps[(item.camera_id, item.frame_id)] = item.map
                continue
            receipt = Receipt(item.camera_id, item.frame_id, item.kind, now, item.capture_ns, item.verdict,
                              item.score, item.threshold, dict(item.timings_ms), item.reason,
                              tuple(item.regions or ()))
            with self._lock:
                self.receipts.append(receipt)

    def snapshot(self) -> list[Receipt]:
        with self._lock:
            return list(self.receipts)

    def count(self, predicate=None) -> int:
        with self._lock:
            return sum(1 for r in self.receipts if predicate is None or predicate(r))

    def wait_for(self, predicate, timeout_s: float) -> bool:
        """True once ``predicate(receipts)`` holds; False at the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return True
            time.sleep(0.02)
        return predicate(self.snapshot())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sub.close()


def handshake(ingest: str, collector: VerdictCollector, frame: np.ndarray, camera_id: str = "warmup",
              warm_frames: int = 3, timeout_s: float = 60.0) -> int:
    """Make sure the subscription is live and the worker warm before any measured frame.

    Sends probe frames (ids from WARMUP_BASE), waiting 0.5 s, 1 s, 2 s ... (at most 5 s) for a record of any
    of them; then waits until every probe has its record (so none is still queued when the load starts),
    then sends ``warm_frames`` more, one at a time. Returns the number of frames sent."""
    from edge_daemon.client import FramePublisher

    sent: list[int] = []
    deadline = time.monotonic() + timeout_s

    def answered(ids, every: bool):
        def check(receipts):
            got = {r.frame_id for r in receipts if r.camera_id == camera_id}
            return set(ids) <= got if every else bool(got & set(ids))

        return check

    with FramePublisher(ingest, camera_id, send_timeout_s=1.0) as pub:
        wait = 0.5
        while True:
            sent.append(pub.send(frame, frame_id=WARMUP_BASE + len(sent)))
            if collector.wait_for(answered(sent, False), min(wait, max(0.0, deadline - time.monotonic()))):
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no record for probe frames within {timeout_s:g} s: daemon not answering")
            wait = min(2 * wait, 5.0)
        for _ in range(warm_frames):
            sent.append(pub.send(frame, frame_id=WARMUP_BASE + len(sent)))
        if not collector.wait_for(answered(sent, True), max(0.1, deadline - time.monotonic())):
            raise RuntimeError(f"probe and warm-up frames not all answered within {timeout_s:g} s")
    return len(sent)


# ---- cameras -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CameraPlan:
    """What one camera process sends: ``n_frames`` at ``fps`` from ``start_monotonic`` (absolute)."""

    camera_id: str
    endpoint: str
    fps: float
    n_frames: int
    start_monotonic: float = 0.0  # 0: start together with the other cameras (run_cameras)
    encoding: str = "raw"  # raw | jpeg
    width: int = 0  # synthetic frames (when frames_path is None)
    height: int = 0
    frames_path: str | None = None  # .npy of N x H x W uint8 frames, cycled
    first_frame_id: int = 0
    seed: int = 0
    hwm: int = 16


@dataclass(frozen=True)
class CameraReport:
    camera_id: str
    sent: tuple[int, ...]  # frame ids handed to the transport
    refused: tuple[int, ...]  # frame ids the transport did not take (HWM full): never sent
    late_ms_max: float  # worst lateness of a send behind its deadline
    late_ms_p99: float
    send_ms_p99: float  # time spent in send (header + copy into ZeroMQ)
    error: str = ""


def synthetic_frames(width: int, height: int, count: int = 4, seed: int = 0) -> np.ndarray:
    """``count`` mono8 frames of smooth texture plus noise (compressible like a real image, not constant)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((count, height, width), dtype=np.uint8)
    for i in range(count):
        fx, fy = rng.uniform(0.002, 0.02, size=2)
        base = 128 + 60 * np.sin(xx * fx + i) * np.cos(yy * fy)
        out[i] = np.clip(base + rng.normal(0, 8, size=(height, width)), 0, 255).astype(np.uint8)
    return out


def _payloads(plan: CameraPlan) -> tuple[list, tuple[int, int]]:
    """Pre-encoded payloads (encoding is the camera's job, kept out of the timed loop)."""
    import cv2

    if plan.frames_path is not None:
        frames = np.load(plan.frames_path, allow_pickle=False)
    else:
        frames = synthetic_frames(plan.width, plan.height, 4, plan.seed)
    if plan.encoding == "raw":
        return [np.ascontiguousarray(f) for f in frames], frames.shape[1:3]
    if plan.encoding != "jpeg":
        raise ValueError(f"encoding must be raw or jpeg, got {plan.encoding!r}")
    out = []
    for f in frames:
        ok, buf = cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise ValueError(f"OpenCV could not encode a {f.shape} frame as JPEG")
        out.append(buf.tobytes())
    return out, frames.shape[1:3]


def _send_loop(plan: CameraPlan, sock, payloads: list, hw: tuple[int, int], stop=None) -> CameraReport:
    import zmq

    from edge_daemon.protocol import encode_header

    sent, refused, late, send_ms = [], [], [], []
    for i in range(plan.n_frames):
        if stop is not None and stop.is_set():
            break
        deadline = plan.start_monotonic + i / plan.fps
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        late.append(max(0.0, time.monotonic() - deadline) * 1e3)
        fid = plan.first_frame_id + i
        payload = payloads[i % len(payloads)]
        t0 = time.perf_counter()
        if plan.encoding == "raw":
            header = encode_header(plan.camera_id, fid, time.time_ns(), "mono8", hw[1], hw[0], 1)
        else:
            header = encode_header(plan.camera_id, fid, time.time_ns(), plan.encoding)
        try:
            sock.send_multipart([header, payload], flags=zmq.NOBLOCK, copy=False)
            sent.append(fid)
        except zmq.Again:
            refused.append(fid)
        send_ms.append((time.perf_counter() - t0) * 1e3)
    return CameraReport(plan.camera_id, tuple(sent), tuple(refused), float(max(late, default=0.0)),
                        float(np.percentile(late, 99)) if late else 0.0,
                        float(np.percentile(send_ms, 99)) if send_ms else 0.0)


def camera_main(plan: CameraPlan, results, stop=None, go=None, start=None) -> None:
    """Entry point of a camera process. Prepares its payloads and connects, reports ``("ready", id)``, waits
    for ``go`` (then starts at the shared ``start`` monotonic time, unless the plan has its own), sends the
    plan until done or ``stop`` is set, and puts its CameraReport on ``results``. Ctrl-C is left to the
    parent, which sets ``stop``."""
    import zmq

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)  # frames already queued still go out at close
    sock.setsockopt(zmq.SNDHWM, plan.hwm)
    try:
        payloads, hw = _payloads(plan)
        sock.connect(plan.endpoint)
        results.put(("ready", plan.camera_id))
        if go is not None and not go.wait(120.0):
            raise TimeoutError("no start signal from the parent within 120 s")
        if not plan.start_monotonic and start is not None:
            plan = replace(plan, start_monotonic=start.value)
        report = _send_loop(plan, sock, payloads, hw, stop)
    except Exception as exc:  # reported to the parent, which fails the run with the reason
        report = CameraReport(plan.camera_id, (), (), 0.0, 0.0, 0.0, f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()
        ctx.term()
    results.put(report)


def run_cameras(plans: list[CameraPlan], timeout_s: float, stop=None, lead_s: float = 0.2
                ) -> list[CameraReport]:
    """Run every plan in its own spawned process. Plans without a start time start together ``lead_s``
    after every camera is ready. Waits for all reports (bounded by ``timeout_s`` after the start) and
    terminates stragglers. ``stop`` (a threading.Event) ends the plans early."""
    ctx = mp.get_context("spawn")
    results, mp_stop, go = ctx.Queue(), ctx.Event(), ctx.Event()
    start = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=camera_main, args=(p, results, mp_stop, go, start),
                         name=f"camera-{p.camera_id}", daemon=True) for p in plans]
    for proc in procs:
        proc.start()
    reports: list[CameraReport] = []
    ready, deadline = 0, time.monotonic() + 120.0
    try:
        while ready + len(reports) < len(plans) and time.monotonic() < deadline:
            item = _get(results, 0.2)
            if isinstance(item, tuple):
                ready += 1
            elif item is not None:
                reports.append(item)  # a camera that failed while preparing
            elif not any(p.is_alive() for p in procs):
                break
        start.value = time.monotonic() + lead_s
        go.set()
        deadline = time.monotonic() + lead_s + timeout_s
        while len(reports) < len(plans) and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                mp_stop.set()
            item = _get(results, 0.2)
            if isinstance(item, CameraReport):
                reports.append(item)
            elif item is None and not any(p.is_alive() for p in procs) and results.empty():
                break
    finally:
        mp_stop.set()
        for proc in procs:  # stop is set: a camera ends within one frame period (capped: poll's limits)
            proc.join(timeout=min(60.0, max(0.1, deadline - time.monotonic())))
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    missing = {p.camera_id for p in plans} - {r.camera_id for r in reports}
    reports += [CameraReport(cam, (), (), 0.0, 0.0, 0.0, "camera process gave no report") for cam in missing]
    return sorted(reports, key=lambda r: r.camera_id)


def _get(queue, timeout_s: float):
    import queue as queue_mod

    try:
        return queue.get(timeout=timeout_s)
    except queue_mod.Empty:
        return None
