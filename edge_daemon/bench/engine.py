"""`edge-bench engine`: engines side by side against plain PyTorch eager FP32 of the same model.

  edge-bench engine --bundle DIR --backend onnxruntime --batch 1,4,16,64 [--streams N] [--precision fp16]
                    [--seconds S] [--json FILE]
  edge-bench engine --bundle DIR --engines cpu --threads 2 --batch 1,8   # every CPU backend and precision
  edge-bench engine --synthetic efficientad-s --tile 256 ...   # UNTRAINED EfficientAD-S-like bundle

It first prints the CPU model and its ISA features (engines.cpuinfo). Per batch size it times the reference a
user would write, DeployModel(core.pt2) in eager FP32 under inference_mode on the same device (torch on
``--threads`` threads), then each engine: tiles/s, ms per batch (p50/p99), peak GPU memory where relevant, and
its ratio to eager. ``--engines`` lists engines as backend[:precision[:hint]] (hint: OpenVINO's latency or
throughput); ``cpu`` stands for onnxruntime:fp32, onnxruntime:int8, openvino:fp32, openvino:bf16,
openvino:int8. An engine this machine cannot run (bf16 without AMX/AVX512-BF16, int8 without model.int8.onnx)
gets a row that says why; the others still run. ``--synthetic`` bundles get an INT8 graph calibrated on
random textures (timing only); a real bundle needs ``edge-engines quantize`` first. With --streams > 1 batches
are submitted round-robin over the slots (throughput); latency is measured submit -> result per batch.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "run", "synthetic_bundle", "synthetic_efficientad_s", "summarise", "parse_engines",
           "CPU_ENGINES"]

CPU_ENGINES = "onnxruntime:fp32,onnxruntime:int8,openvino:fp32,openvino:bf16,openvino:int8"


def add_parser(subparsers) -> None:
    from engines.cli_common import positive_float, positive_int

    parser = subparsers.add_parser("engine", help="engine micro-benchmark vs eager PyTorch FP32")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="model bundle directory")
    source.add_argument("--synthetic", choices=["efficientad-s"], help="export an UNTRAINED model to time")
    parser.add_argument("--tile", type=positive_int, default=256, help="tile size of --synthetic")
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3], help="channels of --synthetic")
    parser.add_argument("--backend", default="auto",
                        help="engine backend when --engines is not given (auto, onnxruntime, openvino, "
                             "torch, tensorrt)")
    parser.add_argument("--device", default=None, help="device of every engine, e.g. cpu or cuda:0; default: "
                                                       "the backend's")
    parser.add_argument("--precision", default=None, choices=["auto", "fp32", "tf32", "fp16", "bf16", "int8"],
                        help="precision when --engines is not given; default: the backend's (fp32 on CPU)")
    parser.add_argument("--engines", default=None,
                        help=f"comma-separated backend[:precision[:hint]] to compare in one run, or 'cpu' "
                             f"for {CPU_ENGINES}; default: --backend alone")
    parser.add_argument("--batch", default="1,4,16,64", help="comma-separated batch sizes")
    parser.add_argument("--streams", type=positive_int, default=1,
                        help="slots (batches in flight) per engine")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads of every engine and of eager torch; default: all cores")
    parser.add_argument("--seconds", type=positive_float, default=5.0, help="time per batch size and engine")
    parser.add_argument("--min-iters", type=positive_int, default=3,
                        help="batches timed at least, however long they take")
    parser.add_argument("--no-reference", action="store_true", help="skip the eager PyTorch reference")
    parser.add_argument("--json", default=None, help="write the figures here; default: print only")
    parser.set_defaults(func=run, quick_caps={"seconds": 0.2, "min_iters": 1, "batch": _quick_batches})


def _quick_batches(text: str) -> str:
    """EDGE_INSPECT_QUICK: batch sizes up to 4."""
    sizes = [b for b in str(text).split(",") if b and int(b) <= 4]
    return ",".join(sizes) or "1"


# --- an untrained EfficientAD-S-like core (used when trainer.models is not importable) --------------------

def synthetic_efficientad_s(tile: int = 256):
    """UNTRAINED EfficientAD-S-like core: x -> B x 2 x h x w (student-teacher, student-AE maps).

    PDN-S teacher (384 out) and student (768 out), EfficientAD autoencoder. torch is imported here, not at
    module import, so `edge-bench` stays quick for the other benchmarks."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def pdn_small(out_channels: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 128, 4, padding=3), nn.ReLU(), nn.AvgPool2d(2, 2, padding=1),
            nn.Conv2d(128, 256, 4, padding=3), nn.ReLU(), nn.AvgPool2d(2, 2, padding=1),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, out_channels, 4))

    class Autoencoder(nn.Module):
        """6 strided convs to a 1x1 latent, then 7 bilinear-upsample + conv stages and a 384-channel head."""

        def __init__(self, out_hw: int):
            super().__init__()
            enc = [3, 32, 32, 64, 64, 64]
            layers = [m for a, b in zip(enc, enc[1:], strict=False)
                      for m in (nn.Conv2d(a, b, 4, 2, 1), nn.ReLU())]
            self.encoder = nn.Sequential(*layers, nn.Conv2d(64, 64, max(1, tile // 32)))
            self.sizes = [max(1, tile // 64 - 1), tile // 32, tile // 16 - 1, tile // 8, tile // 4 - 1,
                          tile // 2 - 1, out_hw]
            self.deconv = nn.ModuleList([nn.Conv2d(64, 64, 4, 1, 2) for _ in range(6)]
                                        + [nn.Conv2d(64, 64, 3, 1, 1)])
            self.head = nn.Conv2d(64, 384, 3, 1, 1)

        def forward(self, x):
            x = self.encoder(x)
            for size, conv in zip(self.sizes, self.deconv, strict=True):
                x = F.relu(conv(F.interpolate(x, size=size, mode="bilinear", align_corners=False)))
            return self.head(x)

    class Core(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.teacher, self.student = pdn_small(384), pdn_small(768)
            with torch.no_grad():
                out_hw = self.teacher(torch.zeros(1, 3, tile, tile)).shape[-1]
            self.autoencoder = Autoencoder(out_hw)

        def forward(self, x):
            teacher, student, ae = self.teacher(x), self.student(x), self.autoencoder(x)
            map_st = ((teacher - student[:, :384]) ** 2).mean(dim=1, keepdim=True)
            map_ae = ((ae - student[:, 384:]) ** 2).mean(dim=1, keepdim=True)
            return torch.cat([map_st, map_ae], dim=1)

    return Core().eval()


def _efficientad_core(tile: int):
    try:
        from trainer.models import create_model
    except ImportError:
        return synthetic_efficientad_s(tile), "built-in PDN-S + AE (untrained)"
    return create_model("efficientad", "s", tile=tile).eval(), "trainer.models efficientad s (untrained)"


def synthetic_bundle(out_dir: str | Path, tile: int = 256, channels: int = 3) -> tuple[Path, str]:
    """Export an UNTRAINED EfficientAD-S-like model as a bundle; returns (dir, description)."""
    from engines.bundle import BundleMeta, InputSpec, MapSpec
    from engines.graph import export_bundle

    core, source = _efficientad_core(tile)
    meta = BundleMeta(
        kind="efficientad", size="s-untrained",
        input=InputSpec(height=tile, width=tile, channels=channels, mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225)),
        map=MapSpec(height=tile // 4, width=tile // 4, stride=4, q_a=(0.0, 0.0), q_b=(1.0, 1.0),
                    weights=(0.5, 0.5)),
        image_threshold=0.5, pixel_threshold=0.5, training={"note": "untrained, for timing only"},
    )
    export_bundle(core, meta, out_dir)
    return Path(out_dir), source


# --- timing -------------------------------------------------------------------------------------------------

def summarise(batch: int, latencies_ms: list[float], wall_s: float, batches: int) -> dict:
    """Pure: per-batch latencies + wall time -> figures."""
    lat = np.asarray(latencies_ms, dtype=np.float64)
    return {"batch": batch, "batches": batches, "tiles_per_s": batch * batches / wall_s,
            "ms_p50": float(np.percentile(lat, 50)), "ms_p99": float(np.percentile(lat, 99))}


def _time_engine(engine, tiles: np.ndarray, seconds: float, min_iters: int) -> dict:
    engine.infer(tiles)  # untimed: first-call allocations, graph capture
    streams, latencies, pending = engine.streams, [], []
    start = time.perf_counter()
    count = 0
    while count < min_iters or time.perf_counter() - start < seconds:
        slot = count % streams
        if len(pending) == streams:
            t0, handle = pending.pop(0)
            handle.result()
            latencies.append((time.perf_counter() - t0) * 1e3)
        pending.append((time.perf_counter(), engine.submit(tiles, slot)))
        count += 1
    for t0, handle in pending:
        handle.result()
        latencies.append((time.perf_counter() - t0) * 1e3)
    return summarise(tiles.shape[0], latencies, time.perf_counter() - start, count)


def _time_reference(model, device: str, tiles: np.ndarray, seconds: float, min_iters: int) -> dict:
    import torch

    def once():
        with torch.inference_mode():
            out = model(torch.from_numpy(tiles).to(device))
            return out.cpu().numpy()

    once()
    latencies, start, count = [], time.perf_counter(), 0
    while count < min_iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        once()
        latencies.append((time.perf_counter() - t0) * 1e3)
        count += 1
    return summarise(tiles.shape[0], latencies, time.perf_counter() - start, count)


def _reference_model(bundle: Path, device: str):
    from engines.bundle import read_bundle
    from engines.graph import DeployModel
    from engines.torch_ import load_core

    meta = read_bundle(bundle)
    core = load_core(bundle / meta.files["torch"]["path"], device)
    return DeployModel(core, meta.input, meta.map).to(device)


def _gpu_peak_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20


def parse_engines(text: str | None, backend: str, precision: str | None) -> list[tuple]:
    """Pure: --engines value -> [(backend, precision, hint)]; None: the engine of --backend/--precision."""
    if not text:
        return [(backend, precision, None)]
    specs = []
    for item in (CPU_ENGINES if text == "cpu" else text).split(","):
        parts = item.strip().split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(f"--engines: {item!r} is not backend[:precision[:hint]]")
        parts += [None] * (3 - len(parts))
        specs.append((parts[0], parts[1] or None, parts[2] or None))
    return specs


def _print_row(name: str, row: dict) -> None:
    gpu = f"  gpu {row['gpu_mb']:.0f} MiB" if row.get("gpu_mb") is not None else ""
    speed = f"  x{row['speedup']:.2f} vs eager" if row.get("speedup") else ""
    print(f"{name:<28} batch {row['batch']:>3}  {row['tiles_per_s']:9.1f} tiles/s  "
          f"p50 {row['ms_p50']:9.2f} ms  p99 {row['ms_p99']:9.2f} ms  ({row['batches']} batches){gpu}{speed}",
          flush=True)


def _spec_name(spec) -> str:
    backend, precision, hint = spec
    return ":".join(p for p in (backend, precision or "default", hint) if p)


def _ensure_int8(bundle: Path, specs, synthetic: bool) -> None:
    """A synthetic bundle gets an INT8 graph calibrated on random tiles when an int8 engine is asked for."""
    from engines.bundle import carried_precisions, read_bundle
    from engines.quantize import quantize_bundle

    meta = read_bundle(bundle)
    if not synthetic or "int8" in carried_precisions(meta) or not any(p == "int8" for _, p, _ in specs):
        return
    rng = np.random.default_rng(0)
    shape = (meta.input.height, meta.input.width, meta.input.channels)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(8)]
    quantize_bundle(bundle, images, count=8, source="random tiles (timing only)")


def _open(bundle: Path, spec, args, max_batch: int):
    from engines import open_engine

    backend, precision, hint = spec
    options = {"hint": hint} if hint else {}
    return open_engine(bundle, backend=backend, device=args.device, precision=precision, streams=args.streams,
                       max_batch=max_batch, threads=args.threads, **options)


def _engine_rows(engine, batches: list[int], eager: dict, args) -> list[dict]:
    name = f"{engine.backend}/{engine.device}/{engine.precision}"
    rows = []
    for batch in batches:
        tiles = np.random.default_rng(batch).integers(0, 256, (batch, *engine.input_shape), dtype=np.uint8)
        row = _time_engine(engine, tiles, args.seconds, args.min_iters)
        row["gpu_mb"] = _gpu_peak_mb(engine.device)
        if batch in eager:
            row["eager"] = eager[batch]
            row["speedup"] = row["tiles_per_s"] / eager[batch]["tiles_per_s"]
        _print_row(name, row)
        rows.append(row)
    return rows


def _time_eager(bundle: Path, device: str, batches: list[int], shape, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    reference = _reference_model(bundle, device)
    eager = {}
    for batch in batches:
        tiles = np.random.default_rng(batch).integers(0, 256, (batch, *shape), dtype=np.uint8)
        eager[batch] = _time_reference(reference, device, tiles, args.seconds, args.min_iters)
        _print_row(f"eager torch fp32 ({torch.get_num_threads()} thr)", eager[batch])
    return eager


def _run_engines(bundle: Path, specs, batches: list[int], args) -> list[dict]:
    from engines import BackendUnavailable, BundleError
    from engines.bundle import read_bundle

    meta = read_bundle(bundle)
    shape = (meta.input.height, meta.input.width, meta.input.channels)
    device = args.device or ("cpu" if all(b in ("onnxruntime", "openvino") for b, _, _ in specs) else None)
    eager = {} if args.no_reference else None
    if eager is None and device is not None:  # before any engine exists: nothing else holds threads
        eager = _time_eager(bundle, device, batches, shape, args)
    reports = []
    for spec in specs:
        try:
            engine = _open(bundle, spec, args, max(batches))
        except (BackendUnavailable, BundleError) as exc:
            print(f"{_spec_name(spec):<28} unavailable: {exc}", flush=True)
            reports.append({"spec": _spec_name(spec), "unavailable": str(exc)})
            continue
        if eager is None:  # GPU backends: the reference runs on the device of the first engine that opens
            eager = _time_eager(bundle, device or engine.device, batches, shape, args)
        rows = _engine_rows(engine, batches, eager, args)
        name = f"{engine.backend}/{engine.device}/{engine.precision}"
        reports.append({"spec": _spec_name(spec), "engine": name, "runtime": getattr(engine, "runtime", None),
                        "streams": engine.streams, "results": rows})
        engine.close()
    return reports


def _print_summary(reports: list[dict]) -> None:
    print("\nengine                        batch   tiles/s    p50 ms    x eager fp32")
    for report in reports:
        for row in report.get("results", []):
            ratio = f"{row['speedup']:.2f}" if row.get("speedup") else "-"
            print(f"{report['engine']:<28} {row['batch']:>6} {row['tiles_per_s']:9.2f} {row['ms_p50']:9.1f} "
                  f"{ratio:>10}")


def run(args) -> int:
    from engines.cpuinfo import read_cpuinfo

    batches = [int(b) for b in str(args.batch).split(",") if b]
    try:
        specs = parse_engines(args.engines, args.backend, args.precision)
    except ValueError as exc:
        print(f"edge-bench engine: {exc}", file=sys.stderr)
        return 2
    cpu = read_cpuinfo()
    print(f"cpu: {cpu.summary()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="edge-bench-engine-") as tmp:
        bundle, source = (Path(args.bundle), "bundle") if args.bundle else synthetic_bundle(
            Path(tmp) / "bundle", args.tile, args.channels)
        _ensure_int8(bundle, specs, synthetic=not args.bundle)
        print(f"model: {bundle.name} ({source}); engines: {', '.join(map(_spec_name, specs))}; "
              f"batches {batches}; threads {args.threads or 'all'}; streams {args.streams}", flush=True)
        reports = _run_engines(bundle, specs, batches, args)
    _print_summary(reports)
    if args.json:
        report = {"cpu": {"model": cpu.model, "isa": list(cpu.isa), "cores": cpu.cores}, "source": source,
                  "threads": args.threads, "engines": reports}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if any("results" in r for r in reports) else 1
