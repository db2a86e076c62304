"""Constant folding: the values of tensors that do not depend on the input's data.

Two uses: fold_constants replaces the small constant subgraphs of a model by their values before shape inference
(in numpy, for the few ops such subgraphs use); ConstantValues gives a ModelGraph the value of any side input a
gradient rule needs (axes, pads, shapes), computing nodes with graph/evaluate.py's evaluator.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import ModelError
from .evaluate import node_attrs, run_node, runtime_failure
from .inputs import BATCH
from .load import is_placeholder

__all__ = ["FOLDERS", "ConstantValues", "constant_node_value", "fold_constants"]

log = logging.getLogger(__name__)


class ConstantValues:
    """The values of a ModelGraph's tensors that do not depend on the input's data, computed once each: weights,
    Constant nodes, Shapes of static shapes, and nodes (If branches included) over such values, run by the one node
    evaluator (graph/evaluate.py)."""

    def __init__(self, model, batch: int | None = None):
        self.model = model  # the ModelGraph: weights, static shapes, producers, opset
        self.batch = batch  # a value for the symbolic batch (graph/inputs.py BATCH) in Shape nodes, or None
        self._values: dict[str, np.ndarray | None] = {}

    def value(self, t: gs.Tensor) -> np.ndarray | None:
        """The value of a tensor that does not depend on the input's data (weights, folded shapes), else None."""
        if t.name not in self._values:
            self._values[t.name] = self._evaluate(t)
        return self._values[t.name]

    def _evaluate(self, t: gs.Tensor) -> np.ndarray | None:
        if t.name in self.model.weights:
            return self.model.weights[t.name]
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        node = self.model.producer(t)
        if node is None:
            return None
        if node.op == "Constant":
            return constant_node_value(node)
        if node.op == "Shape":
            shape = self.model.shape(node.inputs[0])
            if shape is not None and self.batch is not None:
                shape = tuple(self.batch if d == BATCH else d for d in shape)
            if shape is None or not all(isinstance(d, int) for d in shape):
                return None
            start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
            return np.array(shape[start:end], dtype=np.int64)
        if node.op in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"):
            return None
        if node.op == "If":
            return self._branch_value(node, t)
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return None  # Loop, Scan: their bodies are not evaluated
        inputs = [self.value(i) if i.name else None for i in node.inputs]
        if any(v is None for v, i in zip(inputs, node.inputs) if i.name):
            return None
        try:
            values = run_node(node.op, inputs, node_attrs(node), self.model.opset, domain=node.domain or "",
                              outputs=len(node.outputs))
        except Exception as exc:  # onnxruntime's own error types, or its session's ModelError
            raise ModelError(f"cannot compute {node.op} node {node.name!r} from its constant inputs: "
                             f"{runtime_failure(exc)}") from exc
        return values[node.outputs.index(t)]

    def _branch_value(self, node: gs.Node, t: gs.Tensor) -> np.ndarray | None:
        """An If's output when its condition is constant (torchvision's detectors test shapes) and the branch it
        takes computes from constants only: that branch's output, evaluated node by node like the outer graph
        (its nodes read outer tensors as the same objects). A branch that reads data is no constant: None."""
        cond = self.value(node.inputs[0])
        if cond is None or np.asarray(cond).size != 1:
            return None
        branch = node.attrs["then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"]
        return self.value(branch.outputs[node.outputs.index(t)])


_FOLD_LIMIT = 1 << 16  # elements: constant subgraphs compute pads, shapes and scales, not activations


def fold_constants(pinned: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy for shape inference in which the nodes that compute from constants alone are replaced by their
    values, and {tensor: value} of what was folded.

    Exporters compute pads and shapes in small constant subgraphs (efficientnet_pytorch's static_padding: Constant
    -> Reshape -> Slice -> Transpose -> Cast -> Pad); ONNX inference does not evaluate those, leaves everything
    after them unknown, and the probe would then run the whole model to measure it. The few ops such subgraphs
    use are evaluated with numpy (FOLDERS; onnx's reference runtime alone would cost 12 MiB to import)."""
    g = pinned.graph
    values = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer
              if not is_placeholder(t) and int(np.prod(t.dims)) <= _FOLD_LIMIT}
    given = set(values)
    folded_nodes = set()
    for i, node in enumerate(g.node):
        fold = FOLDERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if fold is None or not all(name == "" or name in values for name in node.input):
            continue
        try:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out = np.asarray(fold([values[name] if name else None for name in node.input], attrs))
        except Exception as exc:  # noqa: BLE001 - a form not handled here stays for inference and the probe
            log.debug("not folded for inference: %s (%s)", node.name or node.op_type, exc)
            continue
        if out.size > _FOLD_LIMIT or len(node.output) != 1:
            continue
        values[node.output[0]] = out
        folded_nodes.add(i)
    values = {name: v for name, v in values.items() if name not in given}
    if not values:
        return pinned, {}
    folded = onnx.ModelProto()
    folded.CopyFrom(pinned)
    del folded.graph.node[:]
    folded.graph.node.extend(n for i, n in enumerate(g.node) if i not in folded_nodes)
    folded.graph.initializer.extend(onnx.numpy_helper.from_array(v, name) for name, v in values.items())
    return folded, values


def _fold_constant(inputs, attrs):
    if set(attrs) != {"value"}:
        raise ValueError("only Constant(value=tensor) is folded")
    return onnx.numpy_helper.to_array(attrs["value"])


def _fold_slice(inputs, attrs):
    data, starts, ends = inputs[:3]
    axes = inputs[3] if len(inputs) > 3 and inputs[3] is not None else range(len(starts))
    steps = inputs[4] if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for start, stop, axis, step in zip(starts, ends, axes, steps):
        index[int(axis)] = slice(int(start), int(stop), int(step))  # numpy clamps as ONNX does
    return data[tuple(index)]


def _fold_reshape(inputs, attrs):
    data, shape = inputs
    dims = [data.shape[i] if d == 0 and not attrs.get("allowzero") else int(d) for i, d in enumerate(shape)]
    return data.reshape(dims)


def _axes(inputs, attrs):
    return [int(a) for a in (inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs["axes"])]


def _fold_unsqueeze(inputs, attrs):
    out = inputs[0]
    rank = out.ndim + len(_axes(inputs, attrs))
    for axis in sorted(a % rank for a in _axes(inputs, attrs)):
        out = np.expand_dims(out, axis)
    return out


FOLDERS = {
    "Constant": _fold_constant,
    "Identity": lambda i, a: i[0],
    "Cast": lambda i, a: i[0].astype(onnx.helper.tensor_dtype_to_np_dtype(a["to"])),
    "Reshape": _fold_reshape,
    "Slice": _fold_slice,
    "Transpose": lambda i, a: np.transpose(i[0], a.get("perm")),
    "Concat": lambda i, a: np.concatenate(i, axis=a["axis"]),
    "ConstantOfShape": lambda i, a: np.full([int(d) for d in i[0]], onnx.numpy_helper.to_array(a["value"])[0]
                                            if "value" in a else np.float32(0)),
    "Unsqueeze": _fold_unsqueeze,
    "Squeeze": lambda i, a: np.squeeze(i[0], axis=tuple(_axes(i, a))) if len(i) > 1 or "axes" in a else np.squeeze(i[0]),
    "Gather": lambda i, a: np.take(i[0], i[1], axis=a.get("axis", 0)),
    "Shape": lambda i, a: np.array(i[0].shape[a.get("start", 0):a.get("end")], np.int64),
    "Flatten": lambda i, a: i[0].reshape(int(np.prod(i[0].shape[:a.get("axis", 1)])), -1),
    "Add": lambda i, a: i[0] + i[1],
    "Sub": lambda i, a: i[0] - i[1],
    "Mul": lambda i, a: i[0] * i[1],
}


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            v = node.attrs[key]
            return np.asarray(v.values) if isinstance(v, gs.Constant) else np.asarray(v)
    return None
