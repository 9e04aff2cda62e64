"""Export: bundle files, metadata, and ONNX Runtime output equal to the PyTorch DeployModel."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from engines.bundle import read_bundle
from engines.graph import ONNX_INPUT, DeployModel
from trainer.calibrate import Thresholds, map_spec_from_raw
from trainer.evaluate import raw_maps
from trainer.export import export_model


class StandIn(nn.Module):
    """Same attributes as the real models: two raw maps at stride 4."""

    kind, size, num_maps, map_stride = "standin", "xs", 2, 4
    map_weights = (0.5, 0.5)
    input_mean, input_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4),
                                  nn.Conv2d(8, 2, 1))

    def forward(self, x):
        return self.body(x) ** 2


def _images(n, tile, channels, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, size=(n, tile, tile, channels), dtype=np.uint8))


def _export_and_compare(model, tmp_path, tile, channels):
    spec = map_spec_from_raw(raw_maps(model, _images(3, tile, channels)), model.map_weights, tile)
    meta = export_model(model, tmp_path, tile=tile, channels=channels, map_spec=spec,
                        thresholds=Thresholds(image=0.3, pixel=0.4), training_summary={"steps": 1},
                        metrics={"image_auroc": 0.9}, config={"model": {"kind": model.kind}})
    assert meta == read_bundle(tmp_path)
    assert (meta.image_threshold, meta.pixel_threshold) == (0.3, 0.4)
    assert (meta.input.height, meta.input.channels, meta.map.height) == (tile, channels, tile // 4)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"image_auroc": 0.9}
    assert json.loads((tmp_path / "config.json").read_text())["model"]["kind"] == model.kind
    tiles = np.stack(_images(2, tile, channels, seed=1))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {ONNX_INPUT: tiles})[0]
    with torch.no_grad():
        want = DeployModel(model.eval(), meta.input, meta.map)(torch.from_numpy(tiles)).numpy()
    assert got.shape == (2, 1, tile // 4, tile // 4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    return got


@pytest.mark.parametrize("channels", [1, 3])
def test_standin_export_matches_torch(tmp_path, channels):
    got = _export_and_compare(StandIn(), tmp_path, 32, channels)
    assert np.isfinite(got).all() and got.std() > 0


def test_export_rejects_mismatched_spec(tmp_path):
    model = StandIn()
    spec = map_spec_from_raw(raw_maps(model, _images(2, 32, 1)), model.map_weights, 32)
    with pytest.raises(ValueError, match="does not match tile"):
        export_model(model, tmp_path, tile=64, channels=1, map_spec=spec, thresholds=Thresholds(0.1, 0.1))
    with pytest.raises(ValueError, match="channels"):
        export_model(model, tmp_path, tile=32, channels=2, map_spec=spec, thresholds=Thresholds(0.1, 0.1))


def _real_models():
    models = pytest.importorskip("trainer.models")
    return models.create_model


@pytest.mark.parametrize("kind", ["efficientad", "dfr"])
def test_real_models_export_matches_torch(tmp_path, kind):
    create_model = _real_models()
    tile = 64
    if kind == "efficientad":
        model = create_model("efficientad", "s", tile=tile)
    else:
        model = create_model("dfr", "s", latent=8, pretrained=False)
    _export_and_compare(model, tmp_path, tile, 1)
