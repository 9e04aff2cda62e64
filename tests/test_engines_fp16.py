"""FP16 graph conversion for TensorRT, checked with ONNX Runtime (no TensorRT needed).

Besides the tiny bundle, two stress cores (tests/fp16_stress.py) reproduce EfficientAD's and DFR's map heads
with out-of-distribution tiles that push them past FP16's range: the graph must keep that arithmetic FP32
(finite maps close to FP32, frames FAIL), where converting the whole core gives inf/NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxconverter_common import float16

from engines.bundle import BundleMeta
from engines.fp16 import (
    FP16_MAX,
    cast_input_first,
    convert_to_fp16,
    float_types_by_node,
    fp32_node_names,
    map_head_nodes,
    prepare_onnx,
)
from inspection.pipeline import InspectConfig, inspect_frame
from tests.fp16_stress import STRESS_CORES, good_tiles, ood_tiles, stress_onnx

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


def test_core_is_fp16_and_pre_post_and_map_head_stay_fp32(fp32, fp16):
    types = float_types_by_node(fp16)
    head = map_head_nodes(fp32)
    assert head and all(not name.endswith("Conv") for name in head)
    core = {name: t for name, t in types.items() if name.startswith("/core/") and name not in head
            and "_cast" not in name}
    assert core and all(t == {TensorProto.FLOAT16} for t in core.values()), core
    inserted = ("cast0", "_as_float", "cast1")  # boundary casts the converter adds
    kept = {name: t for name, t in types.items()
            if ("/preprocess/" in name or "/postprocess/" in name or name in head)
            and not name.endswith(inserted)}
    assert any("/postprocess/" in n for n in kept) and any("/preprocess/" in n for n in kept)
    assert all(TensorProto.FLOAT16 not in t for t in kept.values()), kept
    fp16_inits = {i.name for i in fp16.graph.initializer if i.data_type == TensorProto.FLOAT16}
    assert any(name.startswith("core.") for name in fp16_inits)
    assert not any(name.startswith(("preprocess.", "postprocess.")) for name in fp16_inits)


def test_kept_nodes_are_marked_head_or_feed_only_kept(fp32):
    kept = set(fp32_node_names(fp32))
    marked = {n.name for n in fp32.graph.node if "/preprocess/" in n.name or "/postprocess/" in n.name}
    head = map_head_nodes(fp32)
    assert marked <= kept and head <= kept
    assert not any(n.op_type == "Conv" for n in fp32.graph.node if n.name in kept)
    for node in fp32.graph.node:
        if node.name in kept - marked - head:
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


# --- out-of-distribution tiles and the map head -------------------------------------------------------------

def _whole_core_fp16(model):
    """The conversion before the fix: every core node FP16 and the converter's default clipping (1e4)."""
    keep = [n.name for n in model.graph.node if "/preprocess/" in n.name or "/postprocess/" in n.name]
    return float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)


@pytest.fixture(scope="module", params=sorted(STRESS_CORES))
def stress(request, tmp_path_factory):
    path, meta = stress_onnx(request.param, tmp_path_factory.mktemp(request.param) / "model.onnx")
    model = onnx.load(str(path))
    return request.param, model, convert_to_fp16(model), meta


def test_whole_core_in_fp16_overflows_on_ood_tiles(stress):
    _name, fp32, _fp16, _meta = stress
    out = _run(_whole_core_fp16(fp32), ood_tiles())
    assert not np.isfinite(out).all()  # the hazard the map head's FP32 removes


def test_ood_tiles_finite_and_close_to_fp32(stress):
    name, fp32, fp16, _meta = stress
    tiles = np.concatenate([good_tiles(2), ood_tiles()])
    ref, half = _run(fp32, tiles), _run(fp16, tiles)
    assert np.isfinite(ref).all() and np.isfinite(half).all()
    scale = np.abs(ref).reshape(len(ref), -1).max(1)
    np.testing.assert_allclose(half.reshape(len(ref), -1).max(1), scale, rtol=FP16_RTOL)
    np.testing.assert_allclose(half, ref, rtol=FP16_RTOL, atol=FP16_ATOL * scale.max())
    types = float_types_by_node(fp16)
    for node in fp16.graph.node:
        if node.op_type in ("Pow", "ReduceMean", "ReduceSum", "Div") and node.name.startswith("/core/"):
            assert types[node.name] == {TensorProto.FLOAT}, (name, node.name)


def test_no_fp16_round_trip_between_fp32_nodes(stress):
    _name, _fp32, fp16, _meta = stress
    producers = {out: n for n in fp16.graph.node for out in n.output}
    for node in fp16.graph.node:
        if node.op_type == "Cast" and node.attribute[0].i == TensorProto.FLOAT:
            source = producers.get(node.input[0])
            assert not (source is not None and source.op_type == "Cast"
                        and source.attribute[0].i == TensorProto.FLOAT16), node.name


@dataclass
class _GraphEngine:
    """One ONNX graph in ONNX Runtime, shaped like an Engine for inspect_frame (whatever its precision)."""

    model: onnx.ModelProto
    meta: BundleMeta
    max_batch: int = 16
    device: str = "cpu"

    def __post_init__(self):
        self.session = ort.InferenceSession(self.model.SerializeToString(),
                                            providers=["CPUExecutionProvider"])

    @property
    def input_shape(self):
        return self.meta.input.height, self.meta.input.width, self.meta.input.channels

    @property
    def map_shape(self):
        return self.meta.map.height, self.meta.map.width

    def infer(self, tiles):
        return self.session.run(None, {"tiles": tiles})[0]


@pytest.mark.parametrize("kind", range(len(ood_tiles())))
def test_ood_frames_fail_with_finite_scores_through_the_fp16_graph(stress, kind):
    _name, fp32, fp16, meta = stress
    frame = np.tile(ood_tiles()[kind], (2, 2, 1))
    config = InspectConfig(tile_overlap=8)
    for model in (fp32, fp16):
        result = inspect_frame(_GraphEngine(model, meta), frame, config)
        assert result.verdict == "FAIL" and np.isfinite(result.score), result.reason
    good = np.tile(good_tiles(1, seed=9)[0], (2, 2, 1))
    assert inspect_frame(_GraphEngine(fp16, meta), good, config).verdict == "PASS"


def test_whole_core_fp16_graph_still_never_passes_a_nonfinite_frame(stress):
    """The guard on top: even the overflowing graph gives FAIL (score +inf), never PASS."""
    _name, fp32, _fp16, meta = stress
    engine = _GraphEngine(_whole_core_fp16(fp32), meta)
    config = InspectConfig(tile_overlap=8)
    results = [inspect_frame(engine, np.tile(t, (2, 2, 1)), config) for t in ood_tiles()]
    assert all(r.verdict == "FAIL" for r in results)
    assert any(r.score == np.inf and "non-finite" in r.reason for r in results)


def _matmul_graph(first: np.ndarray, second: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    inits = [numpy_helper.from_array(first.astype(np.float32), "w_small"),
             numpy_helper.from_array(second.astype(np.float32), "w_big")]
    nodes = [helper.make_node("MatMul", ["x", "w_small"], ["h"], name="/core/first/MatMul"),
             helper.make_node("MatMul", ["h", "w_big"], ["m"], name="/core/second/MatMul"),
             helper.make_node("Relu", ["m"], ["r"], name="/core/relu/Relu"),
             helper.make_node("MatMul", ["r", "w_small"], ["y"], name="/core/last/MatMul")]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.filterwarnings("ignore:the float32 number")  # the converter reports the subnormal it rounds to
def test_weights_keep_fp16_range_or_stay_fp32():
    """onnxconverter-common's defaults clipped weights to 1e4 / 1e-7; FP16 holds 65504 and 2**-24."""
    first = np.array([[3e4, 5e-8], [-2e4, 1.0]])
    second = np.array([[1e6, 0.0], [0.0, 1.0]])  # outside FP16: its reader stays FP32, the weight exact
    converted = convert_to_fp16(_matmul_graph(first, second))
    weights = {init.name: numpy_helper.to_array(init) for init in converted.graph.initializer}
    assert weights["w_small"].dtype == np.float16
    assert weights["w_small"][0, 0] == np.float16(3e4) and weights["w_small"][1, 0] == np.float16(-2e4)
    assert 0 < float(weights["w_small"][0, 1]) < 1e-7  # kept, as the FP16 subnormal nearest above
    assert weights["w_big"].dtype == np.float32 and weights["w_big"][0, 0] == 1e6
    assert float(np.abs(weights["w_small"]).max()) <= FP16_MAX
