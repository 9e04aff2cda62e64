"""FP16 graph conversion for TensorRT, checked with ONNX Runtime (no TensorRT needed)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from engines.fp16 import cast_input_first, convert_to_fp16, float_types_by_node, fp32_node_names, prepare_onnx

FP16_RTOL, FP16_ATOL = 1e-2, 2e-3  # the documented tolerance (docs/engines.md)


def _run(path_or_model, tiles):
    data = path_or_model if isinstance(path_or_model, (str, bytes)) else path_or_model.SerializeToString()
    session = ort.InferenceSession(data if isinstance(data, bytes) else str(data),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"tiles": tiles})[0]


@pytest.fixture(scope="module")
def fp32(tiny_bundle):
    return onnx.load(str(tiny_bundle / "model.onnx"))


@pytest.fixture(scope="module")
def fp16(fp32):
    return convert_to_fp16(fp32)


def _tiles(batch=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 1), dtype=np.uint8)


def test_io_types_kept(fp16):
    assert [i.type.tensor_type.elem_type for i in fp16.graph.input] == [TensorProto.UINT8]
    assert [o.type.tensor_type.elem_type for o in fp16.graph.output] == [TensorProto.FLOAT]


def test_core_is_fp16_and_pre_post_stay_fp32(fp16):
    types = float_types_by_node(fp16)
    core = {name: t for name, t in types.items() if name.startswith("/core/")}
    assert core and all(t == {TensorProto.FLOAT16} for t in core.values()), core
    inserted = ("cast0", "_as_float")  # boundary casts the converter adds
    kept = {name: t for name, t in types.items()
            if ("/preprocess/" in name or "/postprocess/" in name) and not name.endswith(inserted)}
    assert any("/postprocess/" in n for n in kept) and any("/preprocess/" in n for n in kept)
    assert all(TensorProto.FLOAT16 not in t for t in kept.values()), kept
    fp16_inits = {i.name for i in fp16.graph.initializer if i.data_type == TensorProto.FLOAT16}
    assert any(name.startswith("core.") for name in fp16_inits)
    assert not any(name.startswith(("preprocess.", "postprocess.")) for name in fp16_inits)


def test_kept_nodes_are_marked_or_feed_only_marked(fp32):
    kept = set(fp32_node_names(fp32))
    marked = {n.name for n in fp32.graph.node if "/preprocess/" in n.name or "/postprocess/" in n.name}
    assert marked <= kept
    assert not any(name.startswith("/core/") for name in kept)
    for node in fp32.graph.node:
        if node.name in kept - marked:
            assert node.op_type in ("Constant", "ConstantOfShape")


def test_fp16_matches_fp32_within_tolerance(fp32, fp16):
    tiles = _tiles()
    ref, half = _run(fp32, tiles), _run(fp16, tiles)
    assert half.dtype == np.float32 and half.shape == ref.shape
    span = float(ref.max() - ref.min())
    np.testing.assert_allclose(half, ref, rtol=FP16_RTOL, atol=FP16_ATOL * max(span, 1e-3))
    assert not np.array_equal(half, ref)  # it really ran in reduced precision


def test_verdicts_agree_away_from_threshold(fp32, fp16):
    tiles = _tiles(32, seed=1)
    ref, half = _run(fp32, tiles).reshape(32, -1).max(1), _run(fp16, tiles).reshape(32, -1).max(1)
    threshold = float(np.median(ref))
    clear = np.abs(ref - threshold) > 1e-2 * max(abs(threshold), 1e-6)
    assert clear.sum() >= 16
    np.testing.assert_array_equal((half > threshold)[clear], (ref > threshold)[clear])


def test_cast_input_first_is_exact(fp32):
    model = cast_input_first(fp32)
    first = model.graph.node[0]
    assert first.op_type == "Cast" and list(first.input) == ["tiles"]
    consumers = [n for n in model.graph.node if "tiles" in n.input]
    assert consumers == [first]
    tiles = _tiles()
    np.testing.assert_array_equal(_run(model, tiles), _run(fp32, tiles))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_prepare_onnx_writes_a_runnable_graph(tiny_bundle, tmp_path, fp32, precision):
    path = prepare_onnx(tiny_bundle / "model.onnx", precision, tmp_path / f"{precision}.onnx")
    out = _run(str(path), _tiles())
    np.testing.assert_allclose(out, _run(fp32, _tiles()), rtol=FP16_RTOL, atol=1e-3)


def test_prepare_onnx_rejects_unknown_precision(tiny_bundle, tmp_path):
    with pytest.raises(ValueError, match="precision"):
        prepare_onnx(tiny_bundle / "model.onnx", "int8", tmp_path / "x.onnx")
