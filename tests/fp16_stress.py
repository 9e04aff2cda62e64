"""Stress models and out-of-distribution tiles for the FP16 overflow tests (CPU and GPU).

Two small cores with the arithmetic of the real models' map heads, built so that out-of-distribution (OOD)
tiles push it past FP16's range (65504) while every convolution output stays well inside it:
- ``StudentTeacherStress`` (EfficientAD's head): teacher features normalised by channel mean/std measured on
  good tiles, std clamped at 1e-6 as trainer.fit does. Teacher channel 0 is zero on every good tile (so its
  std is the 1e-6 floor) and lights up on saturated tiles: its normalised value is ~1e5, its square ~1e10.
- ``ReconstructionStress`` (DFR's head): squared reconstruction error summed over 192 feature channels; the
  features are a few hundred on OOD tiles, so the sum is ~1e5.
In FP32 both give large, finite maps; a core computed wholly in FP16 gives inf, and inf x a zero map weight
gives NaN. ``good_tiles``/``ood_tiles`` give the inputs; ``stress_bundle`` exports one (ONNX only, or a full
bundle with core.pt2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from engines.bundle import BundleMeta, InputSpec, MapSpec

TILE = 32
SPEC = InputSpec(height=TILE, width=TILE, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
OOD_KINDS = ("saturated", "dark", "inverted", "binary-noise", "checkerboard")


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    base = 128 + 50 * np.sin(xx * 0.7 + phase[0]) * np.sin(yy * 0.7 + phase[1])
    base = base + rng.normal(0, 6, (size, size))
    return np.clip(base[:, :, None] * np.array([1.0, 0.9, 0.8], np.float32), 0, 255).astype(np.uint8)


def good_tiles(count: int, size: int = TILE, seed: int = 0) -> np.ndarray:
    """count x size x size x 3 uint8 woven textures (the 'good parts')."""
    rng = np.random.default_rng(seed)
    return np.stack([_texture(size, rng) for _ in range(count)])


def ood_tiles(size: int = TILE, seed: int = 1) -> np.ndarray:
    """One tile per OOD_KINDS: saturated, dark, inverted texture, binary noise, one-pixel checkerboard."""
    rng = np.random.default_rng(seed)
    checker = (np.indices((size, size)).sum(0) % 2 * 255).astype(np.uint8)
    tiles = [np.full((size, size, 3), 255, np.uint8), np.zeros((size, size, 3), np.uint8),
             255 - _texture(size, rng), (rng.integers(0, 2, (size, size, 3)) * 255).astype(np.uint8),
             np.repeat(checker[:, :, None], 3, axis=2)]
    return np.stack(tiles)


def _preprocess(tiles: np.ndarray) -> torch.Tensor:
    from engines.graph import Preprocess

    return Preprocess(SPEC)(torch.from_numpy(tiles))


class StudentTeacherStress(nn.Module):
    num_maps = 2

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.teacher = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4))
        self.student = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 1),
                                     nn.AvgPool2d(4))
        with torch.no_grad():  # channel 0: mean of the normalised input - 2: < 0 on textures, > 0 saturated
            self.teacher[0].weight[0] = 1.0 / 27
            self.teacher[0].bias[0] = -2.0
        self.register_buffer("mean", torch.zeros(1, 32, 1, 1))
        self.register_buffer("std", torch.ones(1, 32, 1, 1))
        with torch.no_grad():
            f = self.teacher(_preprocess(good_tiles(8))).transpose(0, 1).reshape(32, -1)
            self.mean.copy_(f.mean(dim=1).view_as(self.mean))
            self.std.copy_(f.std(dim=1).clamp(min=1e-6).view_as(self.std))  # as trainer.fit

    def forward(self, x):
        teacher = (self.teacher(x) - self.mean) / self.std
        student = self.student(x)
        map_st = ((teacher - student[:, :32]) ** 2).mean(dim=1, keepdim=True)
        map_ae = ((student[:, 32:] - teacher) ** 2).mean(dim=1, keepdim=True)
        return torch.cat([map_st, map_ae], dim=1)


class ReconstructionStress(nn.Module):
    num_maps = 1

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 192, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4))
        self.autoencoder = nn.Sequential(nn.Conv2d(192, 8, 1), nn.ReLU(), nn.Conv2d(8, 192, 1))
        with torch.no_grad():
            self.features[0].weight *= 100.0  # features of a few hundred on OOD tiles

    def forward(self, x):
        f = self.features(x)
        return ((self.autoencoder(f) - f) ** 2).sum(dim=1, keepdim=True)


STRESS_CORES = {"student-teacher": StudentTeacherStress, "reconstruction": ReconstructionStress}


def stress_meta(core: nn.Module, image_threshold: float = 1.0) -> BundleMeta:
    """A zero weight on every map but the first: an inf there becomes NaN in the weighted sum."""
    maps = core.num_maps
    return BundleMeta(kind="stress", size="xs", input=SPEC,
                      map=MapSpec(height=TILE // 4, width=TILE // 4, stride=4, q_a=(0.0,) * maps,
                                  q_b=(1.0,) * maps, weights=(1.0,) + (0.0,) * (maps - 1)),
                      image_threshold=image_threshold, pixel_threshold=image_threshold)


def good_threshold(core: nn.Module) -> float:
    """1.5 x the largest FP32 map value on good tiles: every good tile PASSes, OOD tiles are far above."""
    from engines.graph import DeployModel

    model = DeployModel(core, stress_meta(core).input, stress_meta(core).map).eval()
    with torch.inference_mode():
        return 1.5 * float(model(torch.from_numpy(good_tiles(8, seed=5))).max())


def stress_onnx(name: str, out_path: Path) -> tuple[Path, BundleMeta]:
    """Export the stress core ``name`` as model.onnx only (fast): (path, meta with a good threshold)."""
    from dataclasses import replace

    from engines.graph import DeployModel, _export_onnx

    core = STRESS_CORES[name]().eval()
    threshold = good_threshold(core)
    meta = replace(stress_meta(core), image_threshold=threshold, pixel_threshold=threshold)
    _export_onnx(DeployModel(core, meta.input, meta.map).eval(), meta.input, Path(out_path))
    return Path(out_path), meta


def stress_bundle(name: str, out_dir: Path) -> Path:
    """A full bundle (model.onnx, core.pt2, bundle.json) of the stress core ``name``."""
    from engines.graph import export_bundle

    core = STRESS_CORES[name]().eval()
    threshold = good_threshold(core)
    export_bundle(core, stress_meta(core, threshold), out_dir)
    return Path(out_dir)
