"""FP16 core for the PyTorch backend: the heavy part in FP16, the overflow-prone map head in FP32.

The same rule as engines/fp16.py (the ONNX graph TensorRT builds), applied to the torch.export graph of
core.pt2: a node is in the *map head* when no convolution or matrix product (HEAVY_ATEN) lies below it
(EfficientAD's teacher normalisation, squared differences and channel means; DFR's squared error and channel
sum). ``mixed_precision(core)`` rewrites the graph in place:
- call_function nodes outside the head compute in FP16, head nodes in FP32: a cast (aten._to_copy) is
  inserted wherever an argument's dtype differs from what its reader computes in (one cast per value and
  dtype); explicit dtype conversions of the model keep their dtype;
- weights and buffers read only by FP16 nodes are stored FP16; the others (e.g. the teacher's mean/std, read
  by the head) stay FP32, so a 1e-6 std is not rounded to an FP16 subnormal.
The input stays FP32 (cast where FP16 nodes read it); outputs of head nodes are FP32.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

__all__ = ["HEAVY_ATEN", "map_head", "mixed_precision"]

HEAVY_ATEN = frozenset({
    "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "einsum",
})
_CASTS = frozenset({"_to_copy", "to"})  # explicit conversions: their dtype argument is kept


def _opname(node: fx.Node) -> str:
    return getattr(node.target, "_opname", "") if node.op == "call_function" else ""


def _is_heavy(node: fx.Node) -> bool:
    return _opname(node) in HEAVY_ATEN


def map_head(graph: fx.Graph) -> set[fx.Node]:
    """call_function nodes with no heavy op anywhere below them."""
    heavy_below: dict[fx.Node, bool] = {}
    for node in reversed(graph.nodes):
        heavy_below[node] = any(_is_heavy(user) or heavy_below.get(user, False) for user in node.users)
    return {node for node in graph.nodes
            if node.op == "call_function" and not _is_heavy(node) and not heavy_below[node]}


def _attr(module: nn.Module, target: str):
    *path, name = target.split(".")
    for part in path:
        module = getattr(module, part)
    return module, name


def _store_low(gm: fx.GraphModule, node: fx.Node, low: torch.dtype) -> None:
    parent, name = _attr(gm, node.target)
    value = getattr(parent, name)
    if isinstance(value, nn.Parameter):
        setattr(parent, name, nn.Parameter(value.detach().to(low), requires_grad=False))
    elif name in parent._buffers:
        parent._buffers[name] = value.to(low)
    else:
        setattr(parent, name, value.to(low))


def _floating(dtype) -> bool:
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _attr_dtypes(gm: fx.GraphModule, head: set[fx.Node], low: torch.dtype) -> dict[fx.Node, torch.dtype]:
    """Store FP16 the float attributes only FP16 nodes read; return every placeholder/attribute dtype."""
    dtypes: dict[fx.Node, torch.dtype] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            parent, name = _attr(gm, node.target)
            value = getattr(parent, name)
            if not isinstance(value, torch.Tensor):
                continue
            readers = list(node.users)
            if (value.is_floating_point() and readers
                    and all(r.op == "call_function" and r not in head for r in readers)):
                _store_low(gm, node, low)
                value = getattr(parent, name)
            dtypes[node] = value.dtype
        elif node.op == "placeholder":
            dtypes[node] = getattr(node.meta.get("val"), "dtype", torch.float32)
    return dtypes


def _explicit_dtype(node: fx.Node):
    if _opname(node) not in _CASTS:
        return None
    return node.kwargs.get("dtype") or next((a for a in node.args if isinstance(a, torch.dtype)), None)


def _out_dtype(node: fx.Node, want: torch.dtype, dtypes: dict) -> torch.dtype | None:
    """The dtype ``node`` produces after the rewrite (None: not a float tensor, or several)."""
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return None
    dtype = getattr(val, "dtype", None)
    if not _floating(dtype):
        return dtype
    if _explicit_dtype(node) is not None:
        return _explicit_dtype(node)
    float_inputs = any(_floating(dtypes.get(a)) for a in node.all_input_nodes)
    if node.target is not operator.getitem and not float_inputs:
        return dtype  # a factory (zeros, full, ...): the dtype it was given
    return want


def mixed_precision(gm: fx.GraphModule, low: torch.dtype = torch.float16) -> fx.GraphModule:
    """Rewrite ``gm`` (a torch.export module) in place: FP16 heavy part, FP32 map head (see module doc)."""
    graph = gm.graph
    head = map_head(graph)
    dtypes = _attr_dtypes(gm, head, low)
    casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}

    def cast(arg: fx.Node, want: torch.dtype, before: fx.Node) -> fx.Node:
        if not _floating(dtypes.get(arg)) or dtypes[arg] == want:
            return arg
        if (arg, want) not in casts:
            with graph.inserting_before(before):
                casts[(arg, want)] = graph.call_function(torch.ops.aten._to_copy.default, (arg,),
                                                         {"dtype": want})
            dtypes[casts[(arg, want)]] = want
        return casts[(arg, want)]

    for node in list(graph.nodes):
        if node.op != "call_function" or node in casts.values():
            continue
        want = torch.float32 if node in head else low
        if _explicit_dtype(node) is None and node.target is not operator.getitem:
            node.args = fx.node.map_arg(node.args, lambda a, w=want, n=node: cast(a, w, n))
            node.kwargs = fx.node.map_arg(node.kwargs, lambda a, w=want, n=node: cast(a, w, n))
        dtypes[node] = _out_dtype(node, want, dtypes)
    graph.lint()
    gm.recompile()
    return gm
