"""`edge-inspect demo`: the main job end to end on this machine, offline.

1. model   a PatchCore memory bank of good ELPV cells (edge_inspect.train), or the bundle cached under
           ``<workdir>/models/<key>`` (key = hash of the training settings; workdir runs/demo in the current
           directory); ``<workdir>/bundle`` links to the model of the last run (configs/demo.yaml uses it)
2. frames  solar modules (3 x 4 cells of 300 x 300 px, mono8) built from held-out test cells, some with
           defective cells (ELPV probability 1.0); the truth per module is kept
3. daemon  the real daemon (``python -m edge_daemon run``) on loopback ports, ONNX Runtime on the CPU
4. camera  a simulated camera process streams the modules over ZeroMQ at ``fps`` (edge_daemon.bench.loadgen)
5. table   one live row per verdict: frame, truth, verdict, score, latency
6. summary frames, pass/fail, detection rate, false rejects, latency percentiles; under
           ``<workdir>/runs/<time>/`` (``<workdir>/latest`` links to it): report.html with every frame
           (picture, regions, heat map with colour bar, sortable by score), report.png with a few,
           outcomes.json, daemon.log
Ctrl-C or SIGTERM while streaming stops the camera, then the summary and the report cover what was answered
(the result says ``interrupted``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .modules import Module, cell_boxes, draw_modules
from .report import FrameOutcome, format_summary, summarize, write_report
from .train import QUICK, DemoModel, TrainSettings, cached_model, load_cells, train_demo_model

__all__ = ["DemoSettings", "run_demo", "default_workdir", "demo_modules", "daemon_mapping"]

CAMERA = "line1"
KEEP_GOING_MAX_S = 7 * 24 * 3600.0  # --keep-going: a week at most (every wait must fit the OS's timeouts)


def default_workdir() -> Path:
    """runs/demo under the current directory (README: run the demo from the repository root)."""
    return Path("runs") / "demo"


def _link(link: Path, target: Path) -> None:
    """Point the symlink ``link`` at ``target`` (relative), replacing an older link atomically."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


@dataclass(frozen=True)
class DemoSettings:
    train: TrainSettings = field(default_factory=TrainSettings)
    frames: int = 24
    fps: float = 0.5
    defect_share: float = 0.4  # share of modules with defective cells
    max_defects: int = 2  # defective cells in such a module: 1..max_defects
    threads: int = 1  # torch and ONNX Runtime intra-op threads (1: see docs/demo.md)
    workdir: Path = field(default_factory=default_workdir)
    keep_going: bool = False  # stream (cycling the modules) until Ctrl-C
    grace_s: float = 30.0  # a frame is unanswered when no record came for this long after the last frame
    report_frames: int = 4
    retrain: bool = False

    @classmethod
    def quick(cls, workdir: Path, **overrides) -> DemoSettings:
        """Tiny settings for the end-to-end test: a handful of steps, 1 x 2 modules, few frames."""
        base = cls(train=QUICK, frames=4, fps=4.0, defect_share=0.5, max_defects=1, threads=1,
                   workdir=Path(workdir), grace_s=20.0, report_frames=2)
        return replace(base, **overrides)

    def __post_init__(self):
        if self.frames < 1 or self.fps <= 0 or self.threads < 1:
            raise ValueError(f"frames and threads must be >= 1 and fps > 0, got frames={self.frames} "
                             f"fps={self.fps} threads={self.threads}")


def demo_modules(splits, settings: DemoSettings) -> list[Module]:
    """Modules of held-out test cells: good ones and ones with defect probability 1.0."""
    test = splits.test
    good = [(im, n) for im, n, g in zip(test.images, test.names, test.groups, strict=True) if g == "good"]
    bad = [(im, n) for im, n, g in zip(test.images, test.names, test.groups, strict=True) if g == "defect"]
    return draw_modules([g[0] for g in good], [g[1] for g in good], [b[0] for b in bad], [b[1] for b in bad],
                        settings.train.layout, settings.frames, settings.defect_share, settings.max_defects,
                        settings.train.seed + 100)


def daemon_mapping(model: DemoModel, settings: DemoSettings) -> dict:
    """The daemon config of the demo (ports, instance and max_frame are filled in by bench_config)."""
    return {
        "engine": {"bundle": str(model.bundle), "backend": "onnxruntime", "max_batch": 8,
                   "max_delay_us": 2000, "threads": settings.threads},
        "workers": 1,
        "queue": {"slots": 12, "size": 8, "drop_policy": "drop-oldest", "worker_credit": 4},
        "shutdown_timeout_s": 20,
        "map_downscale": 2,
        "inspection": {"tile_overlap": settings.train.tile_overlap},
        "cameras": [{"id": CAMERA, "threshold": model.image_threshold,
                     "ignore": [list(z) for z in settings.train.ignore_zones]}],
        "log_level": "WARNING",
    }


def get_model(settings: DemoSettings, splits, say) -> DemoModel:
    out = settings.workdir / "models" / settings.train.key()
    model = None if settings.retrain else cached_model(out)
    if model is not None:
        say(f"model: cached bundle {model.bundle} (trained earlier with the same settings)")
        return model
    say(f"model: PatchCore memory bank of good {settings.train.cell_type} cells (5-10 minutes on 2 cores) "
        f"into {out}")
    start = time.perf_counter()
    model = train_demo_model(settings.train, out, splits, settings.threads, say)
    say(f"model: ready in {time.perf_counter() - start:.0f} s, module threshold {model.image_threshold:.4f}")
    return model


HEADER = f"{'frame':>5}  {'truth':<13} {'verdict':<7} {'score':>8} {'thr':>7} {'latency ms':>10}  judged"


def _row(o: FrameOutcome) -> str:
    truth = f"{o.defect_cells} defect(s)" if o.defective else "good"
    score = "" if o.score is None else f"{o.score:8.4f}"
    thr = "" if o.threshold is None else f"{o.threshold:7.4f}"
    lat = "" if o.latency_ms is None else f"{o.latency_ms:10.0f}"
    return f"{o.frame_id:>5}  {truth:<13} {o.verdict or o.kind:<7} {score:>8} {thr:>7} {lat:>10}  {o.judged}"


def _outcome(module: Module, frame_id: int, receipt) -> FrameOutcome:
    n = int(module.defects.sum())
    if receipt is None:
        return FrameOutcome(frame_id, n > 0, n, "unanswered")
    return FrameOutcome(frame_id, n > 0, n, receipt.kind, receipt.verdict, receipt.score, receipt.threshold,
                        receipt.latency_ms, receipt.reason, tuple(receipt.regions))


def stream(model: DemoModel, modules: list[Module], settings: DemoSettings, run_dir: Path, say):
    """Start the daemon, stream the modules, print the live table; (outcomes, maps, interrupted)."""
    from edge_daemon.bench.loadgen import DaemonProcess, VerdictCollector, bench_config, handshake

    frames = np.stack([m.image for m in modules])
    frames_path = run_dir / "frames.npy"
    np.save(frames_path, frames, allow_pickle=False)
    h, w = frames.shape[1:]
    config_path, cfg = bench_config(daemon_mapping(model, settings), run_dir, [CAMERA], (w, h), 1)
    say(f"daemon: starting (config {config_path}, log {run_dir / 'daemon.log'})")
    daemon = DaemonProcess(config_path, run_dir / "daemon.log", cfg["endpoints"]["metrics_port"])
    collector = None
    try:
        ready_s = daemon.wait_ready(120.0)
        collector = VerdictCollector(cfg["endpoints"]["output"], maps=True, keep_maps=-1).start()
        handshake(cfg["endpoints"]["ingest"], collector, frames[0], timeout_s=120.0, warm_frames=1)
        count = "until Ctrl-C" if settings.keep_going else f"{len(modules)} frames"
        say(f"daemon: ready in {ready_s:.1f} s; streaming {count} of {w}x{h} mono8 at {settings.fps:g} fps\n")
        outcomes, interrupted = _stream_frames(collector, modules, frames_path, cfg["endpoints"]["ingest"],
                                               settings, say)
        maps = {fid: m for (cam, fid), m in collector.maps.items() if cam == CAMERA}
        return outcomes, maps, interrupted
    finally:
        if collector is not None:
            collector.close()
        code = daemon.stop()
        frames_path.unlink(missing_ok=True)  # the camera's copy of the frames (~1 MB each)
        say(f"daemon: stopped (exit code {code})")


def _stream_frames(collector, modules, frames_path, ingest, settings, say):
    from edge_daemon.bench.loadgen import CameraPlan, run_cameras

    n = 10**9 if settings.keep_going else len(modules)
    plan = CameraPlan(CAMERA, ingest, settings.fps, n, 0.0, "raw",
                      frames_path=str(frames_path), hwm=4)
    stop = threading.Event()
    reports: list = []
    timeout = n / settings.fps + 60 if not settings.keep_going else KEEP_GOING_MAX_S
    cam = threading.Thread(target=lambda: reports.extend(run_cameras([plan], timeout, stop=stop)),
                           daemon=True)
    cam.start()
    say(HEADER)
    printed: set[int] = set()
    outcomes: dict[int, FrameOutcome] = {}
    interrupted = False

    def show_new():
        for r in collector.snapshot():
            if r.camera_id == CAMERA and r.frame_id is not None and r.frame_id not in printed:
                printed.add(r.frame_id)
                o = _outcome(modules[r.frame_id % len(modules)], r.frame_id, r)
                outcomes[r.frame_id] = o
                say(_row(o))

    try:
        while cam.is_alive():
            show_new()
            time.sleep(0.05)
    except KeyboardInterrupt:
        interrupted = True
        say("(interrupted: stopping the camera, then the summary and the report of what was answered)")
        stop.set()
        cam.join(timeout=30)
    sent = [fid for rep in reports for fid in rep.sent]
    for rep in reports:
        if rep.error:
            raise RuntimeError(f"camera {rep.camera_id} failed: {rep.error}")
    # wait for the last records while they keep coming (a backlog drains); give up after grace_s of silence
    last, quiet_since = len(printed), time.monotonic()
    while not set(sent) <= printed and time.monotonic() - quiet_since < settings.grace_s:
        show_new()
        if len(printed) != last:
            last, quiet_since = len(printed), time.monotonic()
        time.sleep(0.05)
    show_new()
    for fid in sent:
        if fid not in outcomes:
            outcomes[fid] = _outcome(modules[fid % len(modules)], fid, None)
    return [outcomes[f] for f in sorted(outcomes)], interrupted


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(settings: DemoSettings, say=_say) -> dict:
    """The whole demo; returns {summary, report paths, model info, seconds}."""
    started = time.perf_counter()
    settings.workdir.mkdir(parents=True, exist_ok=True)
    say(f"data: ELPV {settings.train.cell_type} cells from the installed elpv-dataset package")
    splits = load_cells(settings.train)
    model = get_model(settings, splits, say)
    modules = demo_modules(splits, settings)
    _link(settings.workdir / "bundle", model.bundle)
    run_dir = settings.workdir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    _link(settings.workdir / "latest", run_dir)
    outcomes, maps, interrupted = stream(model, modules, settings, run_dir, say)
    summary = summarize(outcomes)
    say("\n" + format_summary(summary))
    by_id = {o.frame_id: modules[o.frame_id % len(modules)] for o in outcomes}
    meta = {"model": f"PatchCore-s on ELPV {settings.train.cell_type}", "bundle": str(model.bundle),
            "module threshold": round(model.image_threshold, 5), "fps": settings.fps,
            "layout": f"{settings.train.rows}x{settings.train.cols} cells", "run dir": str(run_dir)}
    paths = write_report(run_dir, outcomes, summary, {k: m.image for k, m in by_id.items()}, maps,
                         {k: m.defects for k, m in by_id.items()}, cell_boxes(settings.train.layout), meta,
                         settings.report_frames)
    paths["log"] = run_dir / "daemon.log"
    seconds = time.perf_counter() - started
    say(f"report: {paths['html']} and {paths['png']}  (demo took {seconds:.0f} s)")
    say(f"bundle: {settings.workdir / 'bundle'} (configs/demo.yaml uses runs/demo/bundle)")
    return {"summary": summary, "paths": paths, "model": model.info, "seconds": seconds,
            "outcomes": outcomes, "interrupted": interrupted}
