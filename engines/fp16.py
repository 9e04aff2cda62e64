"""FP32 ONNX graph -> FP16 graph for TensorRT (strongly typed) and ONNX Runtime checks.

The core network becomes FP16; the graph's inputs/outputs keep their types (uint8 tiles in, float32 map out)
and Preprocess/MapPostprocess nodes (names containing "/preprocess/" or "/postprocess/") stay FP32, plus any
node (constants, shape arithmetic) that feeds only such nodes. Casts are inserted at the boundaries by
onnxconverter-common. ``cast_input_first`` makes the uint8 input go straight through a Cast to float, which
TensorRT requires of uint8 network inputs (Transpose on uint8 is not allowed there).

Tolerance (checked by tests/test_engines_fp16.py on the tiny bundle): FP16 maps match FP32 within
atol 2e-3 + rtol 1e-2 of the map's range; image verdicts agree away from the threshold.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

__all__ = ["FP32_MARKERS", "fp32_node_names", "convert_to_fp16", "cast_input_first", "prepare_onnx",
           "float_types_by_node"]

FP32_MARKERS = ("/preprocess/", "/postprocess/")
_CONSTANT_OPS = ("Constant", "ConstantOfShape")  # kept FP32 when they feed only FP32 nodes


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def fp32_node_names(model: onnx.ModelProto, markers: tuple[str, ...] = FP32_MARKERS) -> list[str]:
    """Names of nodes kept FP32: marked pre/post-processing, and constants feeding only kept nodes."""
    graph = model.graph
    keep = {node.name for node in graph.node if any(m in node.name for m in markers)}
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
    """A new model: core FP16, pre/post-processing FP32, I/O types unchanged."""
    from onnxconverter_common import float16

    model = onnx.ModelProto.FromString(model.SerializeToString())
    _name_unnamed(model)
    keep = fp32_node_names(model)
    converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep,
                                                 disable_shape_infer=False)
    _restore_output_types(model, converted)
    onnx.checker.check_model(converted)
    return converted


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
