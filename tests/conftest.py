"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engines.bundle import BundleMeta, InputSpec, MapSpec
from engines.graph import export_bundle


class TinyCore(nn.Module):
    """A translation-equivariant stand-in model: two raw maps at stride 4."""

    def __init__(self, channels: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4),
                                  nn.Conv2d(8, 2, 1))

    def forward(self, x):
        return self.body(x).abs()


def make_tiny_bundle(out_dir, tile: int = 32, channels: int = 1, threshold: float = 0.5):
    meta = BundleMeta(
        kind="tiny", size="xs",
        input=InputSpec(height=tile, width=tile, channels=channels, mean=(0.5, 0.5, 0.5),
                        std=(0.25, 0.25, 0.25)),
        map=MapSpec(height=tile // 4, width=tile // 4, stride=4, q_a=(0.0, 0.0), q_b=(1.0, 2.0),
                    weights=(0.5, 0.5)),
        image_threshold=threshold, pixel_threshold=threshold,
    )
    return export_bundle(TinyCore(), meta, out_dir)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A real bundle (ONNX + torch.export core) of a tiny model: 32x32 mono tiles, 8x8 maps."""
    out = tmp_path_factory.mktemp("bundle")
    make_tiny_bundle(out)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_int8(tiny_bundle, tmp_path_factory):
    """The tiny bundle plus model.int8.onnx, calibrated on synthetic textures (engines.quantize)."""
    import shutil

    import numpy as np

    from engines.quantize import quantize_bundle
    from trainer.data.synthetic import textured_image

    out = tmp_path_factory.mktemp("bundle_int8") / "b"
    shutil.copytree(tiny_bundle, out)
    rng = np.random.default_rng(0)
    quantize_bundle(out, [textured_image(64, rng, channels=1) for _ in range(4)], count=16,
                    source="synthetic textures")
    return out


@pytest.fixture(autouse=True)
def _no_quick_switch(monkeypatch):
    """Tests set their own sizes: the README's quick switch, if exported in this shell, must not change them
    (tests/test_readme.py sets it for the README's commands itself)."""
    monkeypatch.delenv("EDGE_INSPECT_QUICK", raising=False)
