"""FP32 ONNX graph -> FP16 graph for TensorRT (strongly typed) and ONNX Runtime checks.

The heavy part of the core (convolutions, matrix products and everything before the last of them) becomes
FP16; the rest stays FP32:
- the graph's inputs/outputs keep their types (uint8 tiles in, float32 map out);
- Preprocess/MapPostprocess nodes (names containing "/preprocess/" or "/postprocess/");
- the core's *map head*: every node with no convolution or matrix product below it (EfficientAD's teacher
  normalisation ``(t - mean) / std``, the squared differences and channel means; DFR's squared reconstruction
  error and its channel sum). In FP16 these overflow (65504 max: ``Pow`` of a difference above 256, DFR's sum
  over 192 channels of a mean squared error above ~341) on out-of-distribution tiles, and an inf map times a
  zero weight is NaN: so they run FP32, at the cost of a few elementwise ops;
- any node reading a weight outside FP16's range (|x| > 65504), instead of clipping the weight;
- constants (and shape arithmetic) that feed only kept nodes.
Casts are inserted at the boundaries by onnxconverter-common, whose clipping bounds are set to FP16's own
(largest finite 65504, smallest subnormal 2**-24) instead of its defaults 1e4 / 1e-7, which changed weights
that FP16 represents. ``cast_input_first`` makes the uint8 input go straight through a Cast to float, which
TensorRT requires of uint8 network inputs (Transpose on uint8 is not allowed there).

Tolerance (checked by tests/test_engines_fp16.py on the tiny bundle): FP16 maps match FP32 within
atol 2e-3 + rtol 1e-2 of the map's range; image verdicts agree away from the threshold; out-of-distribution
tiles (saturated, inverted, high-contrast noise) give finite maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["FP32_MARKERS", "HEAVY_OPS", "FP16_MAX", "FP16_TINY", "fp32_node_names", "map_head_nodes",
           "out_of_range_nodes", "convert_to_fp16", "cast_input_first", "prepare_onnx", "float_types_by_node"]

FP32_MARKERS = ("/preprocess/", "/postprocess/")
HEAVY_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum")  # FP16's reason to exist: never kept FP32
FP16_MAX = 65504.0  # largest finite FP16
FP16_TINY = 2.0 ** -24  # smallest positive (subnormal) FP16
_CONSTANT_OPS = ("Constant", "ConstantOfShape")  # kept FP32 when they feed only FP32 nodes


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def map_head_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes with no heavy op (HEAVY_OPS) anywhere below them: the overflow-prone map head."""
    graph = model.graph
    users = _consumers(graph)
    heavy_below: dict[str, bool] = {}
    for node in reversed(graph.node):  # ONNX graphs are topologically sorted
        heavy_below[node.name] = any(user.op_type in HEAVY_OPS or heavy_below.get(user.name, False)
                                     for out in node.output for user in users.get(out, []))
    return {node.name for node in graph.node if node.op_type not in HEAVY_OPS and not heavy_below[node.name]}


def _out_of_range(tensor: onnx.TensorProto) -> bool:
    if tensor.data_type != TensorProto.FLOAT:
        return False
    values = numpy_helper.to_array(tensor)
    finite = values[np.isfinite(values)]
    return bool(finite.size) and float(np.abs(finite).max()) > FP16_MAX


def out_of_range_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of nodes reading a float tensor (initializer or Constant) that FP16 cannot hold (|x| > 65504)."""
    graph = model.graph
    big = {init.name for init in graph.initializer if _out_of_range(init)}
    keep = set()
    for node in graph.node:
        values = [a.t for a in node.attribute if a.name == "value"] if node.op_type == "Constant" else []
        if any(_out_of_range(t) for t in values):
            big.update(node.output)
            keep.add(node.name)
    keep.update(node.name for node in graph.node if big.intersection(node.input))
    return keep


def fp32_node_names(model: onnx.ModelProto, markers: tuple[str, ...] = FP32_MARKERS) -> list[str]:
    """Names of nodes kept FP32: pre/post-processing (markers), the map head, readers of weights FP16 cannot
    hold, and constants feeding only kept nodes."""
    graph = model.graph
    keep = {node.name for node in graph.node if any(m in node.name for m in markers)}
    keep |= map_head_nodes(model) | out_of_range_nodes(model)
    users = _consumers(graph)
    graph_outputs = {out.name for out in graph.output}
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.name in keep or not node.name or node.op_type not in _CONSTANT_OPS:
                continue
            consumers = [user for out in node.output for user in users.get(out, [])]
            feeds_output = any(out in graph_outputs for out in node.output)
            if consumers and not feeds_output and all(user.name in keep for user in consumers):
                keep.add(node.name)
                changed = True
    return sorted(keep)


def _name_unnamed(model: onnx.ModelProto) -> None:
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_unnamed_{index}"


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model: core FP16, pre/post-processing and the map head FP32, I/O types unchanged."""
    from onnxconverter_common import float16

    model = onnx.ModelProto.FromString(model.SerializeToString())
    _name_unnamed(model)
    keep = fp32_node_names(model)
    converted = float16.convert_float_to_float16(model, min_positive_val=FP16_TINY, max_finite_val=FP16_MAX,
                                                 keep_io_types=True, node_block_list=keep,
                                                 disable_shape_infer=False)
    _restore_output_types(model, converted)
    _drop_fp16_round_trips(converted)
    onnx.checker.check_model(converted)
    return converted


def _drop_fp16_round_trips(model: onnx.ModelProto) -> None:
    """Bypass FP32 -> Cast(FP16) -> Cast(FP32) chains the converter leaves between kept-FP32 nodes when a
    value has several readers: the round trip would overflow (and round) what is kept FP32 to avoid that."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    users = _consumers(graph)
    renames: dict[str, str] = {}
    dropped = []
    for node in graph.node:
        if not _is_cast(node, TensorProto.FLOAT16) or types.get(node.input[0]) != TensorProto.FLOAT:
            continue
        readers = users.get(node.output[0], [])
        back = [r for r in readers if _is_cast(r, TensorProto.FLOAT)]
        for cast in back:
            renames[cast.output[0]] = node.input[0]
            dropped.append(cast)
        if back and len(back) == len(readers) and node.output[0] not in {o.name for o in graph.output}:
            dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]


def _is_cast(node: onnx.NodeProto, to: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)


def _restore_output_types(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """Undo the FP16 cast onnxconverter-common puts on an output whose producer was kept FP32."""
    graph = converted.graph
    wanted = {out.name: out.type.tensor_type.elem_type for out in original.graph.output}
    for out in graph.output:
        if out.type.tensor_type.elem_type == wanted[out.name]:
            continue
        cast = next((n for n in graph.node if out.name in n.output), None)
        if cast is None or cast.op_type != "Cast":
            raise ValueError(f"FP16 conversion changed the type of output {out.name!r} and cannot undo it")
        source = cast.input[0]
        producer = next(n for n in graph.node if source in n.output)
        producer.output[list(producer.output).index(source)] = out.name
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name == source:
                    node.input[index] = out.name
        graph.node.remove(cast)
        out.type.tensor_type.elem_type = wanted[out.name]


def cast_input_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model where every uint8 graph input feeds one Cast to float32 (TensorRT's uint8 rule)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for graph_input in graph.input:
        if graph_input.type.tensor_type.elem_type != TensorProto.UINT8:
            continue
        cast_out = f"/preprocess/{graph_input.name}_as_float"
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name == graph_input.name:
                    node.input[index] = cast_out
        cast = helper.make_node("Cast", [graph_input.name], [cast_out], to=TensorProto.FLOAT,
                                name=f"/preprocess/{graph_input.name}_cast_first")
        graph.node.insert(0, cast)
    onnx.checker.check_model(model)
    return model


def prepare_onnx(onnx_path: str | Path, precision: str, out_path: str | Path) -> Path:
    """Write the graph TensorRT builds: uint8 cast first, and FP16 core when precision is fp16."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
    model = cast_input_first(onnx.load(str(onnx_path)))
    if precision == "fp16":
        model = convert_to_fp16(model)
    out_path = Path(out_path)
    onnx.save(model, str(out_path))
    return out_path


def float_types_by_node(model: onnx.ModelProto) -> dict[str, set[int]]:
    """Node name -> element types of its float inputs/outputs (for checks that pre/post stayed FP32)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({init.name: init.data_type for init in inferred.graph.initializer})
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16}
    result = {}
    for node in inferred.graph.node:
        seen = {types[name] for name in [*node.input, *node.output] if name in types}
        result[node.name] = seen & floats
    return result
