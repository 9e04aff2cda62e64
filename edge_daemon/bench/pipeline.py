"""`edge-bench pipeline`: time tiling + fusion + verdict of big frames, the engine excluded.

The engine is a stand-in (``StandInEngine``) that implements the Engine protocol without a model:
  zeros   returns zeros of the map shape (nothing to report: the cheapest verdict)
  random  returns pre-drawn random maps (regions to label: a busier verdict)
  pool    NumPy average pooling of the tile by the stride (translation-equivariant; used by the tests)
Figures are per frame, median and p90 over ``--repeat`` runs after one warm-up run, split into the
FrameResult timings (tile / infer / fuse / verdict). The CUDA path (tiles gathered and fused on the device)
runs only when torch sees a GPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from engines.bundle import BundleMeta, InputSpec, MapSpec

__all__ = ["StandInEngine", "DoneHandle", "stand_in_meta", "add_parser", "run"]

DEFAULT_SIZES = ("2048x2048", "4096x4096", "8192x1024")


def stand_in_meta(tile: int, stride: int, channels: int = 1, threshold: float = 0.5) -> BundleMeta:
    inp = InputSpec(height=tile, width=tile, channels=channels, mean=(0.5,) * 3, std=(0.25,) * 3)
    out = MapSpec(height=tile // stride, width=tile // stride, stride=stride, q_a=(0.0,), q_b=(1.0,),
                  weights=(1.0,))
    return BundleMeta(kind="stand-in", size="-", input=inp, map=out, image_threshold=threshold,
                      pixel_threshold=threshold)


@dataclass
class DoneHandle:
    value: object

    def done(self) -> bool:
        return True

    def result(self):
        return self.value


class StandInEngine:
    """A model-free engine with the Engine protocol's shape contract (NumPy, synchronous submit)."""

    backend = "stand-in"
    precision = "fp32"

    def __init__(self, tile: int = 256, stride: int = 4, channels: int = 1, mode: str = "zeros",
                 max_batch: int = 64, streams: int = 1, threshold: float = 0.5, device: str = "cpu"):
        if mode not in ("zeros", "random", "pool"):
            raise ValueError(f"mode must be zeros, random or pool, got {mode!r}")
        self.meta = stand_in_meta(tile, stride, channels, threshold)
        self.mode, self.max_batch, self.streams, self.device = mode, max_batch, streams, device
        self.calls: list[int] = []  # batch size of every call
        h = tile // stride
        rng = np.random.default_rng(0)
        self._random = rng.random((max_batch, 1, h, h), dtype=np.float32) * (threshold * 1.2)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.meta.input.height, self.meta.input.width, self.meta.input.channels

    @property
    def map_shape(self) -> tuple[int, int]:
        return self.meta.map.height, self.meta.map.width

    def infer(self, tiles):
        bad_shape = tuple(tiles.shape[1:]) != self.input_shape or not 1 <= len(tiles) <= self.max_batch
        if tiles.dtype != np.uint8 or bad_shape:
            raise ValueError(f"bad tiles {tiles.dtype} {tuple(tiles.shape)} for {self.input_shape}")
        self.calls.append(len(tiles))
        b, (h, w), s = len(tiles), self.map_shape, self.meta.map.stride
        if self.mode == "zeros":
            return np.zeros((b, 1, h, w), dtype=np.float32)
        if self.mode == "random":
            return self._random[:b].copy()
        gray = tiles.astype(np.float32).mean(axis=3)
        return (gray.reshape(b, h, s, w, s).mean(axis=(2, 4)) / 255.0)[:, None]

    def submit(self, tiles, slot: int = 0) -> DoneHandle:
        if not 0 <= slot < self.streams:
            raise ValueError(f"slot {slot} outside 0..{self.streams - 1}")
        return DoneHandle(self.infer(tiles))

    def warmup(self) -> None:
        self.infer(np.zeros((1,) + self.input_shape, dtype=np.uint8))

    def close(self) -> None:
        pass


def _time_frames(engine, frame, config, repeat: int) -> dict[str, list[float]]:
    from inspection.pipeline import inspect_frame

    inspect_frame(engine, frame, config)  # warm caches (grids, weights)
    out: dict[str, list[float]] = {"total": []}
    for _ in range(repeat):
        start = time.perf_counter()
        result = inspect_frame(engine, frame, config)
        total = (time.perf_counter() - start) * 1e3
        for key, value in result.timings_ms.items():
            out.setdefault(key, []).append(value)
        out["total"].append(total)
        out.setdefault("no_engine", []).append(total - result.timings_ms["infer"])
    return out


def _fmt(values: list[float]) -> str:
    return f"{np.median(values):7.2f} / {np.percentile(values, 90):7.2f}"


def run(args) -> int:
    from inspection.pipeline import InspectConfig

    config = InspectConfig(tile_overlap=args.overlap, fusion=args.fusion)
    devices = ["cpu"]
    if not args.cpu_only:
        try:
            import torch

            if torch.cuda.is_available():
                devices.append("cuda:0")
        except ImportError:
            pass
    from .machine import machine_line

    print(machine_line())
    print(f"tile {args.tile}, stride {args.stride}, overlap >= {args.overlap}, fusion {args.fusion}, "
          f"maps {args.maps}, {args.repeat} runs; ms median / p90")
    print(f"{'frame':>10} {'input':>6} {'device':>7} {'tiles':>5} {'tile':>17} {'fuse':>17} {'verdict':>17} "
          f"{'all but engine':>17}")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        for kind in args.inputs:
            frame = _frame(rng, height, width, kind)
            for device in devices:
                engine = StandInEngine(args.tile, args.stride, 1, args.maps, max_batch=args.batch,
                                       device=device)
                if device != "cpu":
                    engine = _TorchWrap(engine)
                t = _time_frames(engine, frame, config, args.repeat)
                tiles = sum(engine.calls) // (args.repeat + 1) if hasattr(engine, "calls") else -1
                print(f"{size:>10} {kind:>6} {device:>7} {tiles:>5} {_fmt(t['tile'])} {_fmt(t['fuse'])} "
                      f"{_fmt(t['verdict'])} {_fmt(t['no_engine'])}")
    return 0


def _frame(rng, height: int, width: int, kind: str) -> np.ndarray:
    if kind == "mono8":
        return rng.integers(0, 256, (height, width), dtype=np.uint8)
    if kind == "mono16":
        return rng.integers(0, 65536, (height, width), dtype=np.uint16)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


class _TorchWrap:
    """Stand-in engine on a CUDA device: torch tiles in, torch maps out (zeros/random), no model."""

    def __init__(self, inner: StandInEngine):
        import torch

        self.inner, self.torch = inner, torch
        self.meta, self.max_batch, self.streams, self.device = inner.meta, inner.max_batch, 1, inner.device
        self.input_shape, self.map_shape = inner.input_shape, inner.map_shape
        self._random = torch.as_tensor(inner._random, device=inner.device)

    def infer(self, tiles):
        b = tiles.shape[0]
        if self.inner.mode == "random":
            return self._random[:b].clone()
        return self.torch.zeros((b, 1) + self.map_shape, dtype=self.torch.float32, device=tiles.device)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from engines.cli_common import RawDefaultsFormatter, non_negative_int, positive_int

    parser = subparsers.add_parser("pipeline", help="tiling + fusion + verdict per frame (engine excluded)",
                                   description=__doc__, formatter_class=RawDefaultsFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="frames as WxH")
    parser.add_argument("--inputs", nargs="+", default=["mono8"], choices=["mono8", "mono16", "rgb"],
                        help="pixel formats of the frames")
    parser.add_argument("--tile", type=positive_int, default=256, help="tile size of the stand-in model")
    parser.add_argument("--stride", type=positive_int, default=4, help="map stride of the stand-in model")
    parser.add_argument("--overlap", type=non_negative_int, default=32,
                        help="minimum tile overlap, frame pixels")
    parser.add_argument("--fusion", default="blend", choices=["blend", "max"],
                        help="fusion of overlapping maps")
    parser.add_argument("--maps", default="zeros", choices=["zeros", "random", "pool"],
                        help="what the stand-in engine returns (zeros: nothing to find)")
    parser.add_argument("--batch", type=positive_int, default=64, help="engine max_batch")
    parser.add_argument("--repeat", type=positive_int, default=20, help="timed runs per frame size and input")
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA path even when a GPU is there")
    parser.set_defaults(func=run, quick_caps={"repeat": 2, "sizes": lambda v: ["512x512"]})
    return parser
