import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from engines.bundle import BundleError, read_bundle
from engines.graph import DeployModel
from tests.conftest import TinyCore


def test_bundle_roundtrip_and_onnx_matches_torch(tiny_bundle):
    meta = read_bundle(tiny_bundle)
    assert meta.input.height == 32 and meta.map.height == 8
    assert meta.model_id.startswith("tiny-xs-")
    tiles = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    onnx_out = ort.InferenceSession(str(tiny_bundle / "model.onnx")).run(None, {"tiles": tiles})[0]
    ref = DeployModel(TinyCore(), meta.input, meta.map).eval()(torch.from_numpy(tiles)).detach().numpy()
    assert onnx_out.shape == (3, 1, 8, 8)
    np.testing.assert_allclose(onnx_out, ref, rtol=1e-5, atol=1e-6)


def test_edited_onnx_is_rejected(tiny_bundle, tmp_path):
    import shutil
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(copy)


def test_missing_and_malformed_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        read_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="not a model bundle"):
        read_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps({"format": "edge-inspect-bundle", "format_version": 99}))
    with pytest.raises(BundleError, match="format_version"):
        read_bundle(tmp_path)
