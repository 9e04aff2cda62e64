"""The deployable graph around a model's core network, and the bundle export.

Every model kind provides a *core*: ``core(x) -> raw maps`` with x float32 NCHW already normalised and the
result B x K x h x w (K raw anomaly maps, e.g. student-teacher and student-autoencoder for EfficientAD).
The same three pieces run in every backend:

  Preprocess      uint8 NHWC tiles -> float NCHW (mono replicated to the model's channels, (x/255-mean)/std)
  core            the model (FP16 on GPUs)
  MapPostprocess  per raw map 0.1 * (m - q_a) / (q_b - q_a), weighted sum, bilinear resize to the map grid

Pre- and post-processing stay FP32 in every backend: a peer's FP16 port lost accuracy exactly at the map
combination. The ONNX graph holds all three; the PyTorch backend loads only the core (``core.pt2``) and builds
Preprocess/MapPostprocess from bundle.json, so the formulas live in this one file.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .bundle import ONNX_FILE, TORCH_FILE, BundleMeta, InputSpec, MapSpec, read_bundle, write_bundle_json

__all__ = ["Preprocess", "MapPostprocess", "DeployModel", "export_bundle", "ONNX_INPUT", "ONNX_OUTPUT"]

ONNX_INPUT = "tiles"
ONNX_OUTPUT = "anomaly_map"
ONNX_OPSET = 17


class Preprocess(nn.Module):
    """uint8 N x H x W x C tiles -> float32 N x C' x H x W normalised input of the core."""

    def __init__(self, spec: InputSpec):
        super().__init__()
        self.model_channels = spec.model_channels
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        # fold /255 and (x - mean) / std into one multiply-add
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.permute(0, 3, 1, 2).float()
        if x.shape[1] != self.model_channels:
            x = x.expand(-1, self.model_channels, -1, -1)
        return x * self.scale + self.shift


class MapPostprocess(nn.Module):
    """K raw maps -> one normalised map on the output grid (B x 1 x h x w), in FP32."""

    def __init__(self, spec: MapSpec):
        super().__init__()
        q_a = torch.tensor(spec.q_a, dtype=torch.float32).view(1, -1, 1, 1)
        q_b = torch.tensor(spec.q_b, dtype=torch.float32).view(1, -1, 1, 1)
        weights = torch.tensor(spec.weights, dtype=torch.float32).view(1, -1, 1, 1)
        span = torch.clamp(q_b - q_a, min=1e-12)
        self.register_buffer("gain", 0.1 * weights / span)
        self.register_buffer("offset", (-0.1 * weights * q_a / span).sum(dim=1, keepdim=True))
        self.out_hw = (spec.height, spec.width)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        combined = (raw.float() * self.gain).sum(dim=1, keepdim=True) + self.offset
        if tuple(combined.shape[-2:]) != self.out_hw:
            combined = F.interpolate(combined, size=self.out_hw, mode="bilinear", align_corners=False)
        return combined


class DeployModel(nn.Module):
    """Preprocess -> core -> MapPostprocess: the graph that goes into model.onnx."""

    def __init__(self, core: nn.Module, input_spec: InputSpec, map_spec: MapSpec):
        super().__init__()
        self.preprocess = Preprocess(input_spec)
        self.core = core
        self.postprocess = MapPostprocess(map_spec)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.postprocess(self.core(self.preprocess(tiles)))


def _example_tiles(spec: InputSpec, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, spec.height, spec.width, spec.channels), dtype=torch.uint8,
                         generator=gen)


def _export_onnx(model: DeployModel, spec: InputSpec, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (_example_tiles(spec),), str(path), input_names=[ONNX_INPUT],
                          output_names=[ONNX_OUTPUT], opset_version=ONNX_OPSET, do_constant_folding=True,
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}}, dynamo=False)


def _export_core(core: nn.Module, preprocess: Preprocess, spec: InputSpec, path: Path) -> None:
    x = preprocess(_example_tiles(spec))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(core, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def export_bundle(core: nn.Module, meta: BundleMeta, out_dir: str | Path) -> BundleMeta:
    """Write model.onnx, core.pt2 and bundle.json for ``core`` into out_dir; return the final meta."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    core = core.eval().float()
    model = DeployModel(core, meta.input, meta.map).eval()
    with torch.no_grad():
        _export_onnx(model, meta.input, out_dir / ONNX_FILE)
        _export_core(core, model.preprocess, meta.input, out_dir / TORCH_FILE)
    versions = {**meta.versions, "torch": torch.__version__}
    files = {"onnx": {"path": ONNX_FILE, "sha256": ""}, "torch": {"path": TORCH_FILE, "sha256": ""}}
    final = replace(meta, versions=versions, files=files)
    write_bundle_json(out_dir, final)
    return read_bundle(out_dir)
