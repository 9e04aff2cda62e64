"""`edge-bench engine`: engine micro-benchmark against plain PyTorch eager FP32 of the same model.

  edge-bench engine --bundle DIR --backend onnxruntime --batch 1,4,16,64 [--streams N] [--precision fp16]
                    [--seconds S] [--json FILE]
  edge-bench engine --synthetic efficientad-s --tile 256 ...   # UNTRAINED EfficientAD-S-like bundle

Per batch size it prints tiles/s, ms per batch (p50/p99), peak GPU memory where relevant, and the same
figures for the reference a user would write: DeployModel(core.pt2) in eager FP32 under inference_mode on the
same device, with our speed-up over it. With --streams > 1 batches are submitted round-robin over the slots
(throughput); latency is measured submit -> result per batch.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "run", "synthetic_bundle", "synthetic_efficientad_s", "summarise"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("engine", help="engine micro-benchmark vs eager PyTorch FP32")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="model bundle directory")
    source.add_argument("--synthetic", choices=["efficientad-s"], help="export an UNTRAINED model to time")
    parser.add_argument("--tile", type=int, default=256, help="tile size of --synthetic (default 256)")
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3], help="channels of --synthetic")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16"])
    parser.add_argument("--batch", default="1,4,16,64", help="comma-separated batch sizes")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=5.0, help="time per batch size and engine")
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="skip the eager PyTorch reference")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.set_defaults(func=run)


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


def _print_row(name: str, row: dict) -> None:
    gpu = f"  gpu {row['gpu_mb']:.0f} MiB" if row.get("gpu_mb") is not None else ""
    speed = f"  x{row['speedup']:.2f} vs eager" if row.get("speedup") else ""
    print(f"{name:<28} batch {row['batch']:>3}  {row['tiles_per_s']:9.1f} tiles/s  "
          f"p50 {row['ms_p50']:9.2f} ms  p99 {row['ms_p99']:9.2f} ms  ({row['batches']} batches){gpu}{speed}",
          flush=True)


def run(args) -> int:
    import os

    from engines import open_engine

    batches = [int(b) for b in str(args.batch).split(",") if b]
    with tempfile.TemporaryDirectory(prefix="edge-bench-engine-") as tmp:
        bundle, source = (Path(args.bundle), "bundle") if args.bundle else synthetic_bundle(
            Path(tmp) / "bundle", args.tile, args.channels)
        engine = open_engine(bundle, backend=args.backend, device=args.device, precision=args.precision,
                             streams=args.streams, max_batch=max(batches), threads=args.threads)
        name = f"{engine.backend}/{engine.device}/{engine.precision}"
        print(f"model: {engine.meta.model_id} ({source}); tile {engine.input_shape}; engine {name}; "
              f"streams {engine.streams}; cpu cores {os.cpu_count()}", flush=True)
        reference = None if args.no_reference else _reference_model(bundle, engine.device)
        rng = np.random.default_rng(0)
        results = []
        for batch in batches:
            tiles = rng.integers(0, 256, (batch, *engine.input_shape), dtype=np.uint8)
            row = _time_engine(engine, tiles, args.seconds, args.min_iters)
            row["gpu_mb"] = _gpu_peak_mb(engine.device)
            if reference is not None:
                ref = _time_reference(reference, engine.device, tiles, args.seconds, args.min_iters)
                row["eager"] = ref
                row["speedup"] = row["tiles_per_s"] / ref["tiles_per_s"]
                _print_row("eager torch fp32", ref)
            _print_row(name, row)
            results.append(row)
        engine.close()
    if args.json:
        report = {"engine": name, "source": source, "cpu_cores": os.cpu_count(), "results": results}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
