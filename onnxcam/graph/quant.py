"""Quantization facts of a model: whether and how it is quantized, which ops keep a tensor quantized, and the
(scale, zero point) that an integer tensor stands for.

Read by the view (gradients pass through quantized integer tensors), the explainer and the pipeline (quantized
layers reported as real values) and the QOperator/QDQ gradient rules' convention (autodiff/rules/quantize.py).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = ["QUANTIZED_MOVES", "QUANTIZED_PRODUCERS", "SAME_QUANTIZATION", "carries_quantized", "is_quantized",
           "quantization_of"]

# Ops whose integer outputs stand for real values (quantized tensors): gradients pass through them.
QUANTIZED_PRODUCERS = {"QuantizeLinear", "DynamicQuantizeLinear", "QGemm", "ConvInteger", "MatMulInteger"}
# Ops that only move or select values: an integer (quantized) tensor stays quantized through them, so the view's
# reach (which tensors carry a gradient) follows them from any data input (every input of a Concat).
QUANTIZED_MOVES = {"Pad", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat",
                   "Identity", "MaxPool", "Gather", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth", "Tile",
                   "Expand"}
# Of those, the ones whose output shares its data input's (scale, zero point): all but Concat, whose inputs may
# each have their own (QLinearConcat requantizes them to its output's).
SAME_QUANTIZATION = QUANTIZED_MOVES - {"Concat"}


def carries_quantized(node: gs.Node) -> bool:
    """True when `node`'s integer outputs stand for real values (QuantizeLinear, QLinear* kernels, QGemm)."""
    return node.op in QUANTIZED_PRODUCERS or node.op.startswith("QLinear")


def is_quantized(proto: onnx.ModelProto) -> str | None:
    """How a model is quantized: "qoperator" (QLinear*/QGemm kernels), "qdq" (QuantizeLinear/DequantizeLinear
    pairs around float ops), or None. Explanations of such models differentiate their dequantized float
    equivalents (straight-through rounding), which is worth saying next to the maps."""
    ops = {n.op_type for n in proto.graph.node}
    if any(op.startswith("QLinear") or op in ("QGemm", "QAttention", "MatMulInteger", "ConvInteger") for op in ops):
        return "qoperator"
    if "DequantizeLinear" in ops and "QuantizeLinear" in ops:
        return "qdq"
    return None


# (scale, zero point) input indices of the output's quantization, for the ops that write quantized tensors
_OUTPUT_QUANT = {"QuantizeLinear": (1, 2), "QLinearConv": (6, 7), "QLinearMatMul": (6, 7), "QLinearAdd": (6, 7),
                 "QLinearMul": (6, 7), "QLinearSigmoid": (3, 4), "QLinearLeakyRelu": (3, 4),
                 "QLinearAveragePool": (3, 4), "QLinearGlobalAveragePool": (3, 4), "QGemm": (7, 8),
                 "QLinearConcat": (0, 1)}


def quantization_of(proto: onnx.ModelProto, tensor: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(scale, zero point) of an integer tensor of a QOperator or QDQ model: the output quantization of the node
    that writes it (back through SAME_QUANTIZATION's Pad, Reshape, MaxPool... to a QLinear* or QuantizeLinear
    node), else that of a DequantizeLinear that reads it; None when neither tells. With it a caller reports a quantized layer as real
    values: activations (q - zero point) * scale, gradients d/dq / scale (per-tensor scales: activations)."""
    values = {t.name: t for t in proto.graph.initializer}
    values.update({n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"})
    producers = {o: n for n in proto.graph.node for o in n.output}

    def value(node, i):
        name = node.input[i] if i < len(node.input) else ""
        return onnx.numpy_helper.to_array(values[name]) if name in values else None

    node = producers.get(tensor)
    while node is not None and node.op_type in SAME_QUANTIZATION and (node.output[0] == tensor or node.op_type == "Split"):
        tensor = node.input[0]  # (a MaxPool's second output holds positions, not values)
        node = producers.get(tensor)
    if node is not None and node.op_type in _OUTPUT_QUANT and node.output[0] == tensor:
        scale, zp = _OUTPUT_QUANT[node.op_type]
        return value(node, scale), value(node, zp)
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] == tensor:
            return value(node, 1), value(node, 2)
    return None
