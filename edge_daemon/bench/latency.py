"""`edge-bench latency`: end-to-end latency and throughput of the real daemon under open-loop load.

    edge-bench latency --config configs/demo.yaml --cameras 2 --fps 5 --resolution 2048x2048 \\
        --encoding raw --duration 10 [--json out.json] [--png out.png]
    edge-bench latency --config C --sweep --budget-ms 500 ...     # raise the rate until p99 > budget
    edge-bench latency --config C --attach ...                    # a daemon already running with config C
    edge-bench latency --config C --transport ipc --mode single ...   # unix sockets, one daemon process

Without ``--attach`` the daemon is started from a copy of the config (local endpoints: loopback tcp on free
ports, or ipc unix sockets with ``--transport ipc``; ``process_mode`` from ``--mode`` when given; a unique
instance, max_frame at least the frame, the benchmark's cameras; engine, workers, queue and inspection
unchanged) and stopped at the end (SIGTERM, wait, SIGKILL). Each camera is its own process
(spawn) sending synthetic mono8 frames at ``--fps`` on an absolute schedule (loadgen.py); one subscriber
in this process timestamps every record on receipt.

Latency = subscriber receipt - capture stamp (both ``time.time_ns()`` on this machine). Reported per run:
p50/p90/p99/p99.9/max, throughput (verdicts per second while the load ran), sent / refused / answered /
errors / drops / unanswered (no record once the stream has been silent for the grace period), the per-stage
times the workers put in every verdict (queue, tile, infer, fuse, verdict, total), and ``outside`` =
latency - total (transport in, ingest, publisher, transport out).

Engine ceiling, measured in this process while the daemon is idle (before and after the load; the faster
of the two counts, as the less disturbed by other work on the machine): the same bundle, backend, threads,
streams and max_batch through the worker's own ``TileBatcher`` on frames of the benchmark size with
``queue.worker_credit`` frames in flight (the ceiling, frames/s), and one frame at a time (the engine's own
time per frame, the reference for what the daemon adds). The ratio is daemon throughput / (ceiling x
workers); it means "efficiency" only when the daemon is saturated (offered rate above what it answers).

Added latency (the daemon's own overhead, per step): end-to-end p50 / p99 minus the engine's own
one-frame-at-a-time p50 / p99 of the same run (the lower of the measurements before and after the load).
It counts only below saturation (no drops, throughput equal to the offered rate): above it, queueing
dominates. Every run prints the CPU model, its ISA features and the load average before and after: a
figure taken with a load average near or above the number of cores measures the other jobs, not the
daemon.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .loadgen import (
    TRANSPORTS,
    CameraPlan,
    CameraReport,
    DaemonProcess,
    Receipt,
    VerdictCollector,
    bench_config,
    handshake,
    latency_stats,
    local_endpoint,
    run_cameras,
    synthetic_frames,
)
from .machine import machine_info, machine_line

__all__ = ["add_parser", "run", "run_benchmark", "step_stats", "stage_stats", "find_knee", "sweep_rates",
           "measure_ceiling", "own_time", "parse_resolution", "wait_quiet", "STEP_ID_STRIDE"]

STEP_ID_STRIDE = 10_000_000  # frame ids of sweep step k start at k * STEP_ID_STRIDE
STAGES = ("queue", "tile", "infer", "fuse", "verdict", "total")


# ---- pure functions ----------------------------------------------------------------------------------------


def parse_resolution(text: str) -> tuple[int, int]:
    """'2048x2048' -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"resolution must be WxH, e.g. 2048x2048, got {text!r}") from exc
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"resolution must be positive, got {text!r}")
    return w, h


def stage_stats(receipts: list[Receipt]) -> dict[str, dict[str, float | None]]:
    """p50/p99/max per stage from the verdicts' timings, plus ``outside`` = latency - total."""
    out = {}
    for stage in STAGES:
        values = [r.timings_ms[stage] for r in receipts if stage in r.timings_ms]
        if values:
            s = latency_stats(values)
            out[stage] = {"p50": s["p50"], "p99": s["p99"], "max": s["max"], "mean": s["mean"]}
    outside = [r.latency_ms - r.timings_ms["total"] for r in receipts
               if "total" in r.timings_ms and r.latency_ms is not None]
    if outside:
        s = latency_stats(outside)
        out["outside"] = {"p50": s["p50"], "p99": s["p99"], "max": s["max"], "mean": s["mean"]}
    return out


def step_stats(reports: list[CameraReport], receipts: list[Receipt], fps: float, duration_s: float) -> dict:
    """Accounting and latency of one load step. Only records of frames the cameras sent count; a frame
    with no record is unanswered, a second record for a frame is a duplicate."""
    sent = {(r.camera_id, fid) for r in reports for fid in r.sent}
    seen: dict[tuple[str, int], Receipt] = {}
    duplicates = 0
    for rec in receipts:
        key = (rec.camera_id, rec.frame_id)
        if key not in sent:
            continue
        if key in seen:
            duplicates += 1
        else:
            seen[key] = rec
    got = list(seen.values())
    verdicts = [r for r in got if r.kind == "verdict"]
    kinds = {k: sum(r.kind == k for r in got) for k in ("verdict", "error", "drop")}
    window_s = None
    if verdicts:
        first = min(r.capture_ns for r in got if r.capture_ns is not None)
        window_s = max(1e-9, (max(r.recv_ns for r in verdicts) - first) / 1e9)
    return {
        "cameras": len(reports),
        "fps_per_camera": fps,
        "offered_fps": fps * len(reports),
        "duration_s": duration_s,
        "sent": len(sent),
        "refused": sum(len(r.refused) for r in reports),
        "answered": kinds["verdict"],
        "errors": kinds["error"],
        "drops": kinds["drop"],
        "unanswered": len(sent) - len(seen),
        "duplicates": duplicates,
        "throughput_fps": None if window_s is None else kinds["verdict"] / window_s,
        "latency_ms": latency_stats(r.latency_ms for r in verdicts),
        "stages_ms": stage_stats(verdicts),
        "camera_late_ms_max": max((r.late_ms_max for r in reports), default=0.0),
        "camera_errors": [f"{r.camera_id}: {r.error}" for r in reports if r.error],
        "error_reasons": sorted({r.reason for r in got if r.kind == "error"})[:5],
    }


def sweep_rates(start_fps: float, factor: float, steps: int) -> list[float]:
    """Geometric rates per camera: start, start * factor, ... (``steps`` of them)."""
    if start_fps <= 0 or factor <= 1 or steps < 1:
        raise ValueError(f"sweep needs start > 0, factor > 1, steps >= 1; got {start_fps}, {factor}, {steps}")
    return [start_fps * factor**i for i in range(steps)]


def within_budget(step: dict, budget_ms: float) -> bool:
    p99 = step["latency_ms"]["p99"]
    lost = step["drops"] + step["errors"] + step["unanswered"] + step["refused"]
    return p99 is not None and p99 <= budget_ms and lost == 0


def find_knee(steps: list[dict], budget_ms: float) -> dict:
    """The highest offered rate whose p99 stays within the budget with nothing lost (before the first step
    that breaks it), and the first step that breaks it."""
    knee, broke = None, None
    for step in steps:
        if within_budget(step, budget_ms):
            knee = step
        else:
            broke = step
            break
    return {"budget_ms": budget_ms,
            "knee_offered_fps": None if knee is None else knee["offered_fps"],
            "knee_throughput_fps": None if knee is None else knee["throughput_fps"],
            "knee_p99_ms": None if knee is None else knee["latency_ms"]["p99"],
            "first_over_offered_fps": None if broke is None else broke["offered_fps"]}


# ---- engine ceiling ----------------------------------------------------------------------------------------


def measure_ceiling(cfg, frame: np.ndarray, seconds: float = 5.0, min_frames: int = 3) -> dict:
    """The daemon's work without the daemon, with its engine settings (``cfg``: DaemonConfig) and its
    default inspection config, in this process:

    - ceiling: frames/s through ``TileBatcher`` (tiling, batched engine on ``streams`` slots, fusion,
      verdict) with ``queue.worker_credit`` frames in flight, as a worker runs them;
    - own time: one frame at a time through the same batcher (no queueing): per-frame ms p50/p99, the
      reference for what the daemon adds."""
    from edge_daemon.worker import inspect_configs
    from engines.registry import open_engine
    from inspection.batcher import TileBatcher

    e = cfg.engine
    engine = open_engine(e.bundle, backend=e.backend, device=e.device, precision=e.precision,
                         streams=e.streams, max_batch=e.max_batch, threads=e.threads, cache_dir=e.cache_dir,
                         **e.backend_options())
    try:
        engine.warmup()
        config = inspect_configs(cfg, engine.meta)[None]
        batcher = TileBatcher(engine, e.max_batch, e.max_delay_us)
        own = _one_at_a_time(batcher, frame, config, seconds / 2, min_frames)
        fps, frames = _saturated(batcher, frame, config, seconds / 2, min_frames, cfg.queue.worker_credit)
    finally:
        engine.close()
    return {
        "backend": engine.backend, "device": engine.device, "threads": e.threads, "max_batch": e.max_batch,
        "streams": e.streams, "in_flight": cfg.queue.worker_credit, "frames": frames,
        "tiles_per_frame": own["tiles"], "ceiling_fps": fps, "own_ms": latency_stats(own["ms"]),
        "own_infer_ms": latency_stats(own["infer"]),
    }


def _one_at_a_time(batcher, frame, config, seconds: float, min_frames: int) -> dict:
    out: dict = {"ms": [], "infer": [], "tiles": 0}
    start = time.perf_counter()
    for i in range(10**6):
        t0 = time.perf_counter()
        batcher.add(i, "ceiling", frame, config)
        (_, outcome), = batcher.drain(600.0)
        if isinstance(outcome, Exception):
            raise RuntimeError(f"engine ceiling: the frame failed: {outcome}")
        if i > 0:  # the first frame warms caches
            out["ms"].append((time.perf_counter() - t0) * 1e3)
            out["infer"].append(outcome.timings_ms["infer"])
        if len(out["ms"]) >= min_frames and time.perf_counter() - start >= seconds:
            break
    from inspection.pipeline import model_geometry, prepare_frame

    out["tiles"] = len(prepare_frame(frame, model_geometry(batcher._engine), config).tiles)
    return out


def _saturated(batcher, frame, config, seconds: float, min_frames: int, in_flight: int) -> tuple[float, int]:
    added = done = 0
    start = time.perf_counter()
    while done < min_frames or time.perf_counter() - start < seconds:
        while batcher.pending_frames < in_flight:
            batcher.add(added, "ceiling", frame, config)
            added += 1
        done += len(batcher.poll(0.001))
    elapsed = time.perf_counter() - start
    batcher.drain(600.0)
    return done / elapsed, done


# ---- the run -----------------------------------------------------------------------------------------------


def _load_target(args, workdir: Path):
    """(DaemonConfig, mapping path or None for --attach, mapping)."""
    import yaml

    from edge_daemon.config import config_from_mapping, load_config

    if args.attach:
        if args.mode or args.transport:
            raise ValueError("--mode and --transport set up the daemon the benchmark starts; with --attach "
                             "the running daemon's config decides")
        return load_config(args.config, bundle=args.bundle), None, None
    base = yaml.safe_load(Path(args.config).read_text())
    if not isinstance(base, dict):
        raise ValueError(f"{args.config}: not a YAML mapping")
    cams = [f"cam{i}" for i in range(args.cameras)]
    path, data = bench_config(base, workdir, cams, args.resolution, 1, bundle=args.bundle,
                              transport=args.transport or "tcp", process_mode=args.mode)
    return config_from_mapping(data), path, data


def _run_step(k: int, fps: float, args, ingest: str, collector: VerdictCollector, say) -> dict:
    n = max(1, int(round(args.duration * fps)))
    plans = [CameraPlan(f"cam{i}", ingest, fps, n, 0.0, args.encoding, args.resolution[0],
                        args.resolution[1], first_frame_id=k * STEP_ID_STRIDE, seed=i, hwm=args.hwm)
             for i in range(args.cameras)]
    reports = run_cameras(plans, timeout_s=args.duration + 60.0)
    failed = [r for r in reports if r.error]
    if failed:
        raise RuntimeError(f"camera {failed[0].camera_id} failed: {failed[0].error}")
    sent = {(r.camera_id, fid) for r in reports for fid in r.sent}

    def complete(receipts):
        return sent <= {(r.camera_id, r.frame_id) for r in receipts}

    wait_quiet(collector, complete, args.grace)
    step = step_stats(reports, collector.snapshot(), fps, args.duration)
    say(_step_line(step))
    step["samples"] = _samples(reports, collector.snapshot())
    return step


def wait_quiet(collector: VerdictCollector, done, grace_s: float, step_s: float = 0.5) -> bool:
    """Wait until ``done(receipts)``, or until no record has arrived for ``grace_s`` (a backlog still
    draining keeps the wait going). True when done."""
    last_count, last_change = -1, time.monotonic()
    while True:
        if collector.wait_for(done, step_s):
            return True
        count = collector.count()
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change >= grace_s:
            return False


def _samples(reports, receipts) -> list[list]:
    """(capture s from the first capture, latency ms, kind) per record of this step, for the plot."""
    sent = {(r.camera_id, fid) for r in reports for fid in r.sent}
    mine = [r for r in receipts if (r.camera_id, r.frame_id) in sent and r.capture_ns is not None]
    if not mine:
        return []
    t0 = min(r.capture_ns for r in mine)
    return [[(r.capture_ns - t0) / 1e9, r.latency_ms, r.kind] for r in mine]


def run_benchmark(args, say=print) -> dict:
    """Start (or attach to) the daemon, measure the ceiling, run the load step(s); the result dict."""
    if args.workdir:
        return _run_benchmark(args, Path(args.workdir), say)
    with tempfile.TemporaryDirectory(prefix="edge-bench-latency-") as tmp:  # removed at the end
        return _run_benchmark(args, Path(tmp), say)


def _run_benchmark(args, workdir: Path, say) -> dict:
    cfg, path, data = _load_target(args, workdir)
    frame = synthetic_frames(*args.resolution, count=1, seed=99)[0]
    daemon = None
    result: dict = {"args": {k: v for k, v in vars(args).items() if k not in ("func", "quick_caps")},
                    "workers": cfg.workers,
                    "process_mode": cfg.process_mode, "transport": cfg.endpoints.ingest.split("://")[0],
                    "machine_before": machine_info()}
    say(machine_line(result["machine_before"]))
    say(f"daemon: process_mode {cfg.process_mode}, {cfg.workers} worker(s), ingest {cfg.endpoints.ingest}, "
        f"output {cfg.endpoints.output}")
    collector = None
    try:
        if path is not None:
            daemon = DaemonProcess(path, workdir / "daemon.log", data["endpoints"]["metrics_port"])
            result["daemon_ready_s"] = daemon.wait_ready(120.0)
        ingest, output = local_endpoint(cfg.endpoints.ingest), local_endpoint(cfg.endpoints.output)
        if not args.no_ceiling:
            say(f"engine ceiling: {cfg.engine.backend}, {args.resolution[0]}x{args.resolution[1]} mono8 ...")
            result["ceiling_before"] = measure_ceiling(cfg, frame, args.ceiling_seconds)
            say("  before the load: " + _ceiling_line(result["ceiling_before"]))
        collector = VerdictCollector(output).start()
        handshake(ingest, collector, frame, timeout_s=120.0)
        rates = (sweep_rates(args.fps, args.step_factor, args.max_steps) if args.sweep else [args.fps])
        say(_HEADER)
        steps = []
        for k, fps in enumerate(rates, start=1):
            steps.append(_run_step(k, fps, args, ingest, collector, say))
            if args.sweep and not within_budget(steps[-1], args.budget_ms):
                break
        result["steps"] = steps
        if args.sweep:
            result["knee"] = find_knee(steps, args.budget_ms)
        if not args.no_ceiling:
            result["ceiling_after"] = measure_ceiling(cfg, frame, args.ceiling_seconds)
            say("  after the load:  " + _ceiling_line(result["ceiling_after"]))
            # the run less disturbed by other load on the machine counts
            result["ceiling"] = max(result["ceiling_before"], result["ceiling_after"],
                                    key=lambda c: c["ceiling_fps"])
    finally:
        if collector is not None:
            collector.close()
        if daemon is not None:
            result["daemon_exit_code"] = daemon.stop()
        result["machine_after"] = machine_info()
    _add_ratios(result)
    return result


def own_time(result: dict, q: str) -> float | None:
    """The engine's own one-frame time at quantile ``q``: the lower of the two measurements (before and
    after the load), the one less disturbed by other work on the machine."""
    values = [c["own_ms"][q] for c in (result.get("ceiling_before"), result.get("ceiling_after"))
              if c and c["own_ms"][q] is not None]
    return min(values) if values else None


def _add_ratios(result: dict) -> None:
    ceiling = result.get("ceiling")
    own = {q: own_time(result, q) for q in ("p50", "p99")}
    result["own_ms"] = own
    for step in result.get("steps", []):
        if ceiling and step["throughput_fps"]:
            step["ratio_to_ceiling"] = step["throughput_fps"] / (ceiling["ceiling_fps"] * result["workers"])
            for q in ("p50", "p99"):
                lat = step["latency_ms"][q]
                step[f"added_{q}_ms"] = None if lat is None or own[q] is None else lat - own[q]
        step["saturated"] = bool(step["drops"] or (step["throughput_fps"] or 0) < 0.95 * step["offered_fps"])


# ---- output ------------------------------------------------------------------------------------------------

_HEADER = (f"{'offered/s':>9} {'sent':>6} {'answ':>6} {'drop':>5} {'err':>4} {'unans':>5} {'refus':>5} "
           f"{'thru/s':>7} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8} {'max':>8}  (latency ms)")


def _f(x, spec: str = "8.1f") -> str:
    return f"{'-':>{spec.split('.')[0]}}" if x is None else format(x, spec)


def _step_line(s: dict) -> str:
    lat = s["latency_ms"]
    return (f"{s['offered_fps']:9.2f} {s['sent']:6d} {s['answered']:6d} {s['drops']:5d} {s['errors']:4d} "
            f"{s['unanswered']:5d} {s['refused']:5d} {_f(s['throughput_fps'], '7.2f')} {_f(lat['p50'])} "
            f"{_f(lat['p90'])} {_f(lat['p99'])} {_f(lat['p99.9'])} {_f(lat['max'])}")


def _ceiling_line(c: dict) -> str:
    return (f"ceiling {c['ceiling_fps']:.2f} frames/s ({c['in_flight']} in flight, {c['frames']} frames); "
            f"one at a time {c['own_ms']['p50']:.1f} ms p50 / {c['own_ms']['p99']:.1f} ms p99; "
            f"{c['tiles_per_frame']} tiles/frame")


def format_result(result: dict) -> str:
    lines = []
    if "machine_after" in result:
        lines.append("after the run: " + machine_line(result["machine_after"]))
    for s in result.get("steps", []):
        lines.append(f"offered {s['offered_fps']:.2f}/s: stages ms (p50 / p99): " + ", ".join(
            f"{k} {_f(v['p50'], '.1f')} / {_f(v['p99'], '.1f')}" for k, v in s["stages_ms"].items()))
        extra = []
        if "ratio_to_ceiling" in s:
            extra.append(f"daemon/ceiling {100 * s['ratio_to_ceiling']:.0f} %"
                         f"{' (saturated)' if s['saturated'] else ' (not saturated)'}")
        if s.get("added_p99_ms") is not None:
            extra.append(f"added latency (end-to-end minus the engine's own one-frame time): p50 "
                         f"{s['added_p50_ms']:+.2f} ms, p99 {s['added_p99_ms']:+.2f} ms"
                         f"{' (saturated: queueing, not overhead)' if s['saturated'] else ''}")
        extra.append(f"camera lateness max {s['camera_late_ms_max']:.1f} ms")
        if s["duplicates"]:
            extra.append(f"duplicates {s['duplicates']}")
        lines.append("  " + "; ".join(extra))
        for reason in s["error_reasons"]:
            lines.append(f"  error: {reason}")
    if "knee" in result:
        k = result["knee"]
        lines.append(f"knee (p99 <= {k['budget_ms']:g} ms, nothing lost): offered "
                     f"{_f(k['knee_offered_fps'], '.2f')}/s, throughput "
                     f"{_f(k['knee_throughput_fps'], '.2f')}/s, p99 {_f(k['knee_p99_ms'], '.1f')} ms; "
                     f"first over: {_f(k['first_over_offered_fps'], '.2f')}/s")
    return "\n".join(lines)


def write_png(result: dict, path: Path) -> Path:
    """Latency CDF per step and the latency timeline (drops and errors marked at their capture time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cdf, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in result.get("steps", []):
        lat = np.sort([x[1] for x in s["samples"] if x[2] == "verdict"])
        if lat.size:
            ax_cdf.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=f"{s['offered_fps']:.1f} frames/s")
    ax_cdf.set_xlabel("latency ms (capture -> verdict received)")
    ax_cdf.set_ylabel("fraction of frames")
    ax_cdf.set_xscale("log")
    ax_cdf.grid(True, which="both", alpha=0.3)
    ax_cdf.legend(fontsize=8)
    ax_cdf.set_title("latency CDF")
    last = result["steps"][-1] if result.get("steps") else {"samples": [], "offered_fps": 0}
    for kind, marker, color in (("verdict", ".", "tab:blue"), ("drop", "x", "tab:red"),
                                ("error", "x", "tab:orange")):
        pts = [(x[0], x[1]) for x in last["samples"] if x[2] == kind]
        if pts:
            t, v = zip(*pts, strict=True)
            ax_time.scatter(t, v, s=8, marker=marker, color=color, label=f"{kind} ({len(pts)})")
    ax_time.set_xlabel("capture time s")
    ax_time.set_ylabel("latency ms")
    ax_time.set_title(f"timeline at {last['offered_fps']:.1f} frames/s offered")
    ax_time.grid(True, alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run(args) -> int:
    """Errors and interrupts go through edge-bench's one error style (engines/cli_common.run_cli: SIGTERM
    unwinds like Ctrl-C, through the finally blocks that stop the daemon)."""
    result = run_benchmark(args)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
        print(f"json: {args.json}")
    if args.png:
        print(f"png: {write_png(result, Path(args.png))}")
    lost = sum(s["unanswered"] + len(s["camera_errors"]) for s in result.get("steps", []))
    return 0 if lost == 0 and result.get("steps") else 1


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from engines.cli_common import RawDefaultsFormatter, positive_float, positive_int

    p = subparsers.add_parser("latency", help="end-to-end latency of the daemon under open-loop load",
                              description=__doc__, formatter_class=RawDefaultsFormatter)
    p.add_argument("--config", required=True, help="daemon YAML config")
    p.add_argument("--bundle", help="model bundle; overrides engine.bundle (relative: to the current "
                                    "directory)")
    p.add_argument("--attach", action="store_true", help="use a daemon already running with --config")
    p.add_argument("--cameras", type=positive_int, default=1, help="camera processes")
    p.add_argument("--fps", type=positive_float, default=2.0,
                   help="frames/s per camera (sweep: the first rate)")
    p.add_argument("--resolution", type=parse_resolution, default=(2048, 2048),
                   help="WxH (default 2048x2048)")
    p.add_argument("--encoding", choices=("raw", "jpeg"), default="raw", help="mono8 raw or JPEG q90")
    p.add_argument("--duration", type=positive_float, default=10.0, help="seconds of load per step")
    p.add_argument("--grace", type=positive_float, default=30.0,
                   help="a frame is unanswered when no record came for this many seconds")
    p.add_argument("--hwm", type=positive_int, default=16, help="camera PUSH high-water mark")
    p.add_argument("--transport", choices=TRANSPORTS, default=None,
                   help="frames in and verdicts out over loopback tcp or ipc unix sockets; default tcp")
    p.add_argument("--mode", choices=("multi", "single"), default=None,
                   help="process_mode of the started daemon; default: the config's")
    p.add_argument("--sweep", action="store_true", help="raise the rate until p99 > --budget-ms")
    p.add_argument("--budget-ms", type=positive_float, default=1000.0, help="p99 budget of the sweep")
    p.add_argument("--step-factor", type=positive_float, default=1.4, help="rate factor between sweep steps")
    p.add_argument("--max-steps", type=positive_int, default=8, help="sweep steps at most")
    p.add_argument("--ceiling-seconds", type=positive_float, default=5.0, help="time spent on the ceiling")
    p.add_argument("--no-ceiling", action="store_true", help="skip the engine ceiling")
    p.add_argument("--workdir", help="keep the config copy and the daemon log here; default: a temporary "
                                     "folder, removed at the end")
    p.add_argument("--json", help="write the full result here; default: print only")
    p.add_argument("--png", help="write the latency CDF and timeline here; default: none")
    p.set_defaults(func=run, quick_caps={"duration": 2.0, "ceiling_seconds": 0.5, "grace": 20.0,
                                         "max_steps": 2, "resolution": _quick_resolution})
    return p


def _quick_resolution(wh: tuple[int, int]) -> tuple[int, int]:
    """EDGE_INSPECT_QUICK: frames of at most 512 x 512."""
    return min(wh[0], 512), min(wh[1], 512)
