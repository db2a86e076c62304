"""A model opened for explanation: its graph (onnx-graphsurgeon), static shapes, constant values and paths.

Shapes come from ONNX shape inference with the input's spatial size fixed, on a copy in which small constant
subgraphs (computed pads, shapes) are folded; where inference still cannot see through run-time computed shapes,
a probe measures them on the part of the model between the nearest known activations and the unknown tensors (in
numpy when that part is shape plumbing, else with onnxruntime). The forward graph is never altered: the
explained model computes exactly what the deployed model computes.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections import deque

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import InputError, LayerError, ModelError
from .load import detach_weights, is_placeholder

log = logging.getLogger(__name__)

BATCH = "N"  # the symbolic batch dimension
# Ops that only re-label the score: a Softmax behind them still counts as the model's last op.
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Cast"}
_SOFTMAX = {"Softmax", "LogSoftmax"}


def default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("the model imports no ai.onnx opset")


class ModelGraph:
    """The graph of one model at one input size (batch left symbolic)."""

    def __init__(self, proto: onnx.ModelProto, input_shape: tuple[int, ...] | None = None,
                 weights: dict | None = None):
        """proto: a model, or a skeleton (graph/load.py detach_weights) whose large weights are in `weights`."""
        if weights is None:
            proto, weights = detach_weights(proto, owned=False)
        self.proto = proto
        self.weights = weights  # name -> numpy array of each large initializer (placeholders in the graph)
        self.opset = default_opset(proto)
        inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
        if not inputs:
            raise ModelError("the model has no inputs")
        self.input_name = inputs[0].name
        self.extra_inputs = [i.name for i in inputs[1:]]
        declared = _declared_shape(inputs[0])
        self.declared_input_shape = declared
        self.fixed_batch = isinstance(declared[0], int) if declared else False
        self.input_shape = _resolve_input_shape(declared, input_shape, self.input_name)
        self.graph = gs.import_onnx(_infer(proto, weights, self.input_name, self.input_shape))
        self.graph.toposort()
        self.tensors = self.graph.tensors()
        self._order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        self._values: dict[str, np.ndarray | None] = {}

    # ---- lookups -------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> gs.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise LayerError(f"no tensor named {name!r} in the model{_close(name, self.tensors)}") from None

    @staticmethod
    def producer(t: gs.Tensor) -> gs.Node | None:
        return t.inputs[0] if t.inputs else None

    def order(self, node: gs.Node) -> int:
        return self._order[id(node)]

    def shape(self, t: gs.Tensor) -> tuple | None:
        """Static shape: ints, BATCH for the batch dimension, None for unknown dims; None if the rank is unknown."""
        if isinstance(t, gs.Constant):
            return tuple(t.shape)
        return None if t.shape is None else tuple(d if isinstance(d, int) and d >= 0 else (d or None) for d in t.shape)

    def value(self, t: gs.Tensor) -> np.ndarray | None:
        """The value of a tensor that does not depend on the input's data (weights, folded shapes), else None."""
        if t.name not in self._values:
            self._values[t.name] = self._evaluate(t)
        return self._values[t.name]

    def _evaluate(self, t: gs.Tensor) -> np.ndarray | None:
        if t.name in self.weights:
            return self.weights[t.name]
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        node = self.producer(t)
        if node is None:
            return None
        if node.op == "Constant":
            return _constant_node_value(node)
        if node.op == "Shape":
            shape = self.shape(node.inputs[0])
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
        return _run_single_node(node, inputs, self.opset)[node.outputs.index(t)]

    def _branch_value(self, node: gs.Node, t: gs.Tensor) -> np.ndarray | None:
        """An If's output when its condition is constant (torchvision's detectors test shapes) and the branch it
        takes computes from constants only: that branch's output, evaluated node by node like the outer graph
        (its nodes read outer tensors as the same objects). A branch that reads data is no constant: None."""
        cond = self.value(node.inputs[0])
        if cond is None or np.asarray(cond).size != 1:
            return None
        branch = node.attrs["then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"]
        return self.value(branch.outputs[node.outputs.index(t)])

    # ---- paths ---------------------------------------------------------------------------------------------
    def forward_reach(self, starts: list[gs.Tensor]) -> set[str]:
        """Tensors that depend differentiably on the starts (integer results such as ArgMax indices do not)."""
        seen, todo = {t.name for t in starts}, deque(starts)
        while todo:
            t = todo.popleft()
            for node in t.outputs:
                moves = _moves_data(node, t)
                for k, out in enumerate(node.outputs):
                    moved = moves and (k == 0 or node.op == "Split")
                    if out.name not in seen and (moved or _carries_gradient(out, node)):
                        seen.add(out.name)
                        todo.append(out)
        return seen

    def backward_reach(self, end: gs.Tensor) -> set[str]:
        seen, todo = {end.name}, deque([end])
        while todo:
            node = self.producer(todo.popleft())
            if node is None:
                continue
            for inp in node.inputs:
                if inp.name and inp.name not in seen:
                    seen.add(inp.name)
                    todo.append(inp)
        return seen

    def path_nodes(self, starts: list[gs.Tensor], end: gs.Tensor) -> tuple[list[gs.Node], set[str]]:
        """Nodes on some path from a start tensor to the end tensor (topological order), and the tensors on it."""
        on_path = self.forward_reach(starts) & self.backward_reach(end)
        nodes = [n for n in self.graph.nodes if any(o.name in on_path for o in n.outputs)
                 and any(i.name in on_path for i in n.inputs)]
        return nodes, on_path

    # ---- what to explain -----------------------------------------------------------------------------------
    def default_score(self, output: str | None = None) -> str:
        """The logits: the chosen (default first) float output, or the input of a Softmax that produces it."""
        outputs = [o for o in self.graph.outputs if o.dtype is not None and np.issubdtype(o.dtype, np.floating)]
        if output is not None:
            outputs = [o for o in self.graph.outputs if o.name == output]
            if not outputs:
                names = [o.name for o in self.graph.outputs]
                raise LayerError(f"the model has no output named {output!r}; its outputs are {names}")
        if not outputs:
            raise ModelError("the model has no floating-point output to explain")
        t = outputs[0]
        while (node := self.producer(t)) is not None:
            if node.op in _SOFTMAX:
                return node.inputs[0].name
            if node.op not in _PASS_THROUGH:
                break
            t = node.inputs[0]
        return outputs[0].name

    def default_layer(self, score: str) -> str:
        """The last 4-D activation with spatial size > 1 on the path from the input to the score."""
        src = self.tensor(self.input_name)
        nodes, on_path = self.path_nodes([src], self.tensor(score))
        for node in reversed(nodes):
            for out in node.outputs:
                if out.name in on_path and _is_spatial_map(self.shape(out)):
                    return out.name
        raise LayerError("found no 4-D activation with a spatial size > 1 on the path to the score; name a layer")

    def check_reaches(self, layer: str, score: str) -> None:
        if layer not in self.backward_reach(self.tensor(score)):
            near = [n for n in difflib.get_close_matches(layer, list(self.tensors), n=8, cutoff=0.5)
                    if n in self.backward_reach(self.tensor(score))]
            hint = f"; close matches that do: {near[:5]}" if near else ""
            raise LayerError(f"layer {layer!r} does not reach the score tensor {score!r}{hint}")


# Ops whose integer outputs stand for real values (quantized tensors): gradients pass through them.
_QUANTIZED_PRODUCERS = {"QuantizeLinear", "DynamicQuantizeLinear", "QGemm"}
# Ops that only move or select values: an integer (quantized) tensor stays quantized through them.
_MOVES = {"Pad", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat", "Identity",
          "MaxPool", "Gather", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth", "Tile", "Expand"}


def _moves_data(node: gs.Node, t: gs.Tensor) -> bool:
    """True when `node` moves the values of `t` (its data input; any input of a Concat) to its outputs."""
    return node.op in _MOVES and (node.op == "Concat" or (bool(node.inputs) and node.inputs[0] is t))


def _carries_gradient(t: gs.Tensor, producer: gs.Node) -> bool:
    if t.dtype is None or producer.op in _QUANTIZED_PRODUCERS or producer.op.startswith("QLinear"):
        return True
    try:
        return np.issubdtype(np.dtype(t.dtype), np.floating)
    except TypeError:  # onnx-only types (bfloat16, float8) arrive as TensorProto enums
        return "FLOAT" in onnx.TensorProto.DataType.Name(int(t.dtype))


def _is_spatial_map(shape: tuple | None) -> bool:
    if shape is None or len(shape) != 4:
        return False
    # (N, C, H, W) or (N, H, W, C): a map has two non-unit dims besides the batch.
    return sum(1 for d in shape[1:] if not (isinstance(d, int) and d <= 1)) >= 2


def _close(name: str, names) -> str:
    near = difflib.get_close_matches(name, list(names), n=5, cutoff=0.4)
    return f"; close matches: {near}" if near else ""


def _declared_shape(value_info: onnx.ValueInfoProto) -> tuple | None:
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


def _resolve_input_shape(declared, given, name) -> tuple | None:
    """Non-batch dims: those the model declares, else those given (None where still free: shapes are then
    inferred symbolically and nothing is measured); the batch stays symbolic. None when the input declares no
    shape and none is given: its rank and size are those of the first input that arrives."""
    if given is not None:
        given = _checked_given(given, name)
    if declared is None:
        return None if given is None else (BATCH,) + given[1:]
    _check_size(declared, f"input {name!r} declares shape {_fmt(declared)}", ModelError)
    shape = [BATCH if (declared[0] is None and i == 0) else d for i, d in enumerate(declared)]
    if given is not None:
        if len(given) != len(declared):
            raise InputError(f"input {name!r} has rank {len(declared)} (shape {_fmt(declared)}), got {_fmt(given)}")
        for i, (d, g) in enumerate(zip(declared, given)):
            if i > 0 and d is not None and d != g:
                raise InputError(f"input {name!r} expects shape {_fmt(declared)}, got {_fmt(given)}")
            if i > 0 and d is None:
                shape[i] = g
    return tuple(shape)


# Elements per sample beyond which no input is built for: 16 GiB of float32, and far from int64 overflow in the
# element counts the gradient rules compute (a 2^40 x 2^40 input overflowed them to 0).
MAX_SAMPLE_ELEMENTS = 1 << 32


def _checked_given(given, name) -> tuple:
    """A given input shape as positive ints (the batch dim may be anything: it stays symbolic)."""
    try:
        dims = tuple(int(d) if i > 0 else d for i, d in enumerate(given))
        ok = all(d == g and d > 0 for d, g in zip(dims[1:], tuple(given)[1:]))
    except (TypeError, ValueError):
        ok = False
    if not ok or not dims:
        raise InputError(f"the input shape for {name!r} must be positive ints (batch first), got {given!r}")
    _check_size(dims, f"input shape {_fmt(dims)} for {name!r}", InputError)
    return dims


def _check_size(dims, what: str, error: type) -> None:
    known = [d for d in dims[1:] if isinstance(d, int)]
    if any(d < 0 for d in known):
        raise error(f"{what} has a negative dim")
    elements = float(np.prod([float(d) for d in known]))  # floats: an int64 product can overflow to 0
    if elements > MAX_SAMPLE_ELEMENTS:
        raise error(f"{what}: {elements:.3g} values per sample, more than onnxcam builds for ({MAX_SAMPLE_ELEMENTS})")


def _fmt(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _infer(skeleton: onnx.ModelProto, weights: dict, input_name: str, shape: tuple) -> onnx.ModelProto:
    """Shape inference on the weight-less skeleton with the input's shape pinned (batch symbolic)."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(skeleton)
    del pinned.graph.value_info[:]
    declared_outputs = _unpin_outputs(pinned)
    for inp in pinned.graph.input:
        if inp.name == input_name and shape is not None:
            dims = inp.type.tensor_type.shape.dim
            if len(dims) == 0 and shape:
                for _ in shape:
                    dims.add()
            for d, v in zip(dims, shape):
                if isinstance(v, int):
                    d.Clear()
                    d.dim_value = v
                elif v is not None and not d.HasField("dim_value"):
                    d.Clear()
                    d.dim_param = v
    folded, values = _fold_constants(pinned)
    try:
        inferred = onnx.shape_inference.infer_shapes(folded, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is a convenience; the probe below recovers what it misses
        log.debug("shape inference failed: %s", exc)
        inferred = folded
    if values:  # the model as it is, with what inference found, and the folded tensors' own shapes and types
        del inferred.graph.node[:]
        inferred.graph.node.extend(pinned.graph.node)
        del inferred.graph.initializer[:]
        inferred.graph.initializer.extend(pinned.graph.initializer)
        inferred.graph.value_info.extend(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for name, v in values.items())
    _probe_missing_shapes(inferred, weights, input_name, shape)
    if shape is not None and all(isinstance(d, int) for d in shape[1:]):  # symbolic shapes say little
        _compare_outputs(inferred, declared_outputs)
    return inferred


def _unpin_outputs(model: onnx.ModelProto) -> dict:
    """Remove the graph outputs' declared shapes (returned by name): exporters write wrong ones (a text recognizer
    declares [1, 'seqlen'] and returns (T, 1, C)), and inference keeps a declared shape over what it computes."""
    declared = {}
    for out in model.graph.output:
        tt = out.type.tensor_type
        if tt.HasField("shape"):
            declared[out.name] = _declared_shape(out)
            tt.ClearField("shape")
    return declared


def _compare_outputs(model: onnx.ModelProto, declared: dict) -> None:
    """Say when an output's declared shape disagrees with the computed (inferred or measured) one."""
    for out in model.graph.output:
        want = declared.get(out.name)
        tt = out.type.tensor_type
        if want is None or not tt.HasField("shape"):
            continue
        got = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        if len(got) != len(want) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                        for a, b in zip(got, want)):
            log.warning("output %r declares shape %s but the model computes %s: the computed shape is used",
                        out.name, _fmt(want), _fmt(got))


_FOLD_LIMIT = 1 << 16  # elements: constant subgraphs compute pads, shapes and scales, not activations


def _fold_constants(pinned: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy for shape inference in which the nodes that compute from constants alone are replaced by their
    values, and {tensor: value} of what was folded.

    Exporters compute pads and shapes in small constant subgraphs (efficientnet_pytorch's static_padding: Constant
    -> Reshape -> Slice -> Transpose -> Cast -> Pad); ONNX inference does not evaluate those, leaves everything
    after them unknown, and the probe would then run the whole model to measure it. The few ops such subgraphs
    use are evaluated with numpy (_FOLDERS; onnx's reference runtime alone would cost 12 MiB to import)."""
    g = pinned.graph
    values = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer
              if not is_placeholder(t) and int(np.prod(t.dims)) <= _FOLD_LIMIT}
    given = set(values)
    folded_nodes = set()
    for i, node in enumerate(g.node):
        fold = _FOLDERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
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


_FOLDERS = {
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


def _probe_missing_shapes(proto: onnx.ModelProto, weights: dict, input_name: str, shape: tuple) -> None:
    """Fill shapes that inference left unknown by running the model (with its weights) at batch 1 and 2."""
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        return  # a free size: never measured at a guessed one (the model may accept only some sizes)
    known = {vi.name: vi for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input)}
    measure_all = _shape_inference_unreliable(proto)
    missing = []
    for node in proto.graph.node:
        for out in node.output:
            vi = known.get(out)
            if out and (vi is None or not _fully_shaped(vi) or measure_all):
                missing.append(out)
    if not missing:
        return
    typed = {name for name in missing if name in known and known[name].type.tensor_type.elem_type}
    part = proto if measure_all else _part_computing(proto, missing, known)
    shapes, dtypes = _probe(part, weights, input_name, shape, missing, typed)
    for name, (s1, s2) in shapes.items():
        dims = [BATCH if a != b else a for a, b in zip(s1, s2)] if s2 is not None else list(s1)
        vi = known.get(name)
        if vi is None:
            vi = proto.graph.value_info.add()
            vi.name = name
        elem = vi.type.tensor_type.elem_type
        vi.type.tensor_type.Clear()
        vi.type.tensor_type.elem_type = elem or dtypes[name]
        for d in dims:
            dim = vi.type.tensor_type.shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d


def _fully_shaped(vi: onnx.ValueInfoProto) -> bool:
    """Every dim known: a number, or a symbol the model declared (inference's own 'unk__' names are unknowns)."""
    tt = vi.type.tensor_type
    return tt.HasField("shape") and all(
        d.HasField("dim_value") or (d.dim_param and not d.dim_param.startswith("unk__")) for d in tt.shape.dim)


def _part_computing(proto: onnx.ModelProto, names: list, known: dict) -> onnx.ModelProto:
    """The part of the model that computes `names` from the nearest activations whose shapes are known.

    Those activations (float, rank >= 3, every dim a number or the batch) become inputs: a probe then runs a few
    nodes on small random tensors instead of the whole model. Integer and 1-D tensors are never cut, since their
    values (shapes, pads, scales) may decide the shapes being measured; nor is anything under a control-flow node.
    """
    g = proto.graph
    producer = {out: node for node in g.node for out in node.output}
    wanted, cuts, kept, stack = set(names), {}, set(), list(names)
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in kept or name in cuts:
            continue
        if name not in wanted and _activation_with_known_shape(known.get(name)):
            cuts[name] = known[name]
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return proto  # subgraphs read outer names implicitly: keep the whole model
        kept.add(id(node))
        stack.extend(i for i in node.input if i)
    if not cuts:
        return proto
    part = onnx.ModelProto()
    part.CopyFrom(proto)
    nodes = [n for n in g.node if id(n) in kept]
    used = {i for n in nodes for i in n.input}
    del part.graph.node[:]
    part.graph.node.extend(nodes)
    inputs = [i for i in g.input if i.name in used] + list(cuts.values())
    del part.graph.input[:]
    part.graph.input.extend(inputs)
    initializers = [t for t in g.initializer if t.name in used]
    del part.graph.initializer[:]
    part.graph.initializer.extend(initializers)
    del part.graph.output[:]
    part.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    return part


def _activation_with_known_shape(vi) -> bool:
    tt = vi.type.tensor_type if vi is not None else None
    return (tt is not None and tt.elem_type in _FLOAT_TYPES and tt.HasField("shape") and len(tt.shape.dim) >= 3 and
            all(d.HasField("dim_value") or (i == 0 and d.dim_param and not d.dim_param.startswith("unk__"))
                for i, d in enumerate(tt.shape.dim)))


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def _shape_inference_unreliable(proto: onnx.ModelProto) -> bool:
    """onnx's inference disagrees with onnxruntime on ceil_mode pools whose last window starts in the end
    padding, and everything after such a pool inherits the error: then every shape is measured."""
    return any(n.op_type in ("MaxPool", "AveragePool", "LpPool") and
               any(a.name == "ceil_mode" and a.i for a in n.attribute) for n in proto.graph.node)


_PROBE_CHUNK = 96


def _probe(proto, weights, input_name, shape, names, typed: set = frozenset()):
    """Run the model at batch 1 (and 2 when the batch is free) and read the shapes of `names`.

    The shapes come from onnxruntime's profiler, which records every node's output shapes: the model runs as it
    is, reusing memory as a plain inference does. Tensors the profile does not name are measured as graph outputs,
    a few dozen per session: those all live until a run ends, so exposing every tensor at once would need the
    memory of all activations together (several times an inference on models full of run-time shapes).
    typed: names whose element type is known already (the profile cannot always tell it).
    """
    found = _shape_plumbing_probe(proto, input_name, shape, names)
    if found is not None:
        return found
    present = {t.name for t in proto.graph.initializer}
    weights = {name: v for name, v in weights.items() if name in present}  # a part of the model needs fewer
    shapes, dtypes = _profiled_shapes(proto, weights, input_name, shape, set(names))
    rest = [name for name in names if name not in shapes or (name not in dtypes and name not in typed)]
    shapes = {name: v for name, v in shapes.items() if name not in rest}
    for start in range(0, len(rest), _PROBE_CHUNK):
        found, types = _probe_chunk(proto, weights, input_name, shape, rest[start:start + _PROBE_CHUNK])
        shapes.update(found)
        dtypes.update(types)
    return shapes, dtypes


def _shape_plumbing_probe(proto, input_name, shape, names):
    """The probe in numpy, for a part made of shape plumbing only (a flatten's Shape -> Gather -> Concat ->
    Reshape): (shapes, dtypes) as _probe gives them, or None when the part has other ops or needs weights.
    A second onnxruntime session, however small, would cost more memory than the whole model's inference adds."""
    g = proto.graph
    if any(n.op_type not in _FOLDERS or n.domain not in ("", "ai.onnx") or len(n.output) != 1 for n in g.node) or \
            any(is_placeholder(t) for t in g.initializer):
        return None
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    runs = []
    for n in _probe_batches(shape):
        values = dict(constants)
        for inp in g.input:
            tt = inp.type.tensor_type
            declared = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            values[inp.name] = np.zeros(_probe_dims(declared, inp.name == input_name, shape, n),
                                        onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type or 1))
        try:
            for node in g.node:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                values[node.output[0]] = np.asarray(
                    _FOLDERS[node.op_type]([values[i] if i else None for i in node.input], attrs))
        except Exception as exc:  # noqa: BLE001 - a form the numpy ops do not cover: onnxruntime measures it
            log.debug("numpy probe gave up: %s", exc)
            return None
        runs.append({name: values[name] for name in names})
    shapes = {name: (runs[0][name].shape, runs[1][name].shape if len(runs) > 1 else None) for name in names}
    return shapes, {name: onnx.helper.np_dtype_to_tensor_dtype(runs[0][name].dtype) for name in names}


# onnxruntime profiler type names -> ONNX element types
_PROFILE_TYPES = {"float": onnx.TensorProto.FLOAT, "double": onnx.TensorProto.DOUBLE,
                  "float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16,
                  "int64": onnx.TensorProto.INT64, "int32": onnx.TensorProto.INT32, "int16": onnx.TensorProto.INT16,
                  "int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8, "uint16": onnx.TensorProto.UINT16,
                  "uint32": onnx.TensorProto.UINT32, "uint64": onnx.TensorProto.UINT64, "bool": onnx.TensorProto.BOOL}


def _profiled_shapes(proto, weights, input_name, shape, wanted: set):
    """{name: (shape at batch 1, at batch 2 or None)}, {name: elem type} of the wanted tensors the profile shows."""
    import json
    import tempfile

    from ..runtime import cpu_session

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.value_info[:]
    for out in probe.graph.output:
        if out.type.tensor_type.elem_type == 0:  # an UNDEFINED declared type makes onnxruntime refuse the model
            out.ClearField("type")
    outputs_of = {}
    for i, node in enumerate(probe.graph.node):  # unique names: the profile identifies nodes by name
        node.name = f"onnxcam_probe_{i}"
        outputs_of[node.name] = list(node.output)
    with tempfile.TemporaryDirectory() as folder:
        sess = cpu_session(probe.SerializeToString(), weights, lean=True,
                           profile=os.path.join(folder, "probe"))
        try:
            for n in _probe_batches(shape):
                sess.run(None, _probe_feed(sess, input_name, shape, n))
        except Exception as exc:
            raise _probe_failed(exc, input_name, shape, n, probe, proto) from exc
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    seen: dict[str, list] = {}
    dtypes = {}
    for e in sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                    key=lambda e: e.get("ts", 0)):
        outs = outputs_of.get(e["name"][:-len("_kernel_time")])
        found = e.get("args", {}).get("output_type_shape")
        if outs is None or found is None or len(found) != len(outs):
            continue
        for name, entry in zip(outs, found):
            if name in wanted and len(entry) == 1:
                (kind, dims), = entry.items()
                seen.setdefault(name, []).append(tuple(int(d) for d in dims))
                if kind in _PROFILE_TYPES:
                    dtypes[name] = _PROFILE_TYPES[kind]
    runs = len(_probe_batches(shape))
    shapes = {name: (got[0], got[1] if runs > 1 else None) for name, got in seen.items() if len(got) == runs}
    if _has_narrow_floats(proto):  # onnxruntime runs some fp16 ops in float32 (inserted casts): "float" may lie
        dtypes = {name: t for name, t in dtypes.items() if t != onnx.TensorProto.FLOAT}
    return shapes, {name: dtypes[name] for name in shapes if name in dtypes}


_NARROW_FLOATS = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _has_narrow_floats(proto: onnx.ModelProto) -> bool:
    g = proto.graph
    values = list(g.input) + list(g.output) + list(g.value_info)
    return (any(v.type.tensor_type.elem_type in _NARROW_FLOATS for v in values)
            or any(t.data_type in _NARROW_FLOATS for t in g.initializer)
            or any(a.name == "to" and a.i in _NARROW_FLOATS for n in g.node if n.op_type == "Cast" for a in n.attribute))


def _probe_batches(shape) -> tuple:
    return (1,) if isinstance(shape[0], int) else (1, 2)


def _probe_feed(sess, input_name, shape, n: int) -> dict:
    """Random inputs: `shape` with batch n for the model input and for the activations a probe starts from
    (_part_computing), ones for the free dims of any other input."""
    rng = np.random.default_rng(0)
    feed = {}
    for inp in sess.get_inputs():
        dims = _probe_dims(inp.shape, inp.name == input_name, shape, n)
        feed[inp.name] = rng.standard_normal(dims).astype(_np_type(inp.type))
    return feed


def _probe_dims(declared, model_input: bool, shape, n: int) -> list:
    """A probe input's dims at batch n: the model input's pinned shape, or another input's declared dims with the
    batch symbol at n and any other free dim at 1."""
    if model_input:
        return [n if i == 0 and not isinstance(d, int) else d for i, d in enumerate(shape)]
    return [d if isinstance(d, int) else n if d == shape[0] else 1 for d in declared]


def _probe_chunk(proto, weights, input_name, shape, names):
    from ..runtime import cpu_session  # local: graph analysis otherwise needs no runtime

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    for name in names:
        probe.graph.output.add().name = name
    del probe.graph.value_info[:]  # the probe measures; half-inferred shapes must not constrain it
    sess = cpu_session(probe.SerializeToString(), weights, lean=True)
    results, dtypes = [], {}
    for n in _probe_batches(shape):
        try:
            outs = sess.run(names, _probe_feed(sess, input_name, shape, n))
        except Exception as exc:
            raise _probe_failed(exc, input_name, shape, n, probe, proto) from exc
        results.append([o.shape for o in outs])
        dtypes.update({name: onnx.helper.np_dtype_to_tensor_dtype(o.dtype) for name, o in zip(names, outs)})
    second = results[1] if len(results) > 1 else [None] * len(names)
    shapes = {name: (tuple(a), None if b is None else tuple(b)) for name, a, b in zip(names, results[0], second)}
    return shapes, dtypes


def _probe_failed(exc: Exception, input_name: str, shape: tuple, n: int, probe: onnx.ModelProto,
                  original: onnx.ModelProto) -> ModelError:
    """The one line that says at which input size the model fails, in which node (by its own name), and why."""
    dims = tuple(_probe_dims(shape, True, shape, n))
    renamed = {p.name: o.name for p, o in zip(probe.graph.node, original.graph.node)}
    return ModelError(f"the model fails at input {input_name!r} shape {dims}: {runtime_failure(exc, renamed)}")


def runtime_failure(exc: Exception, renamed: dict | None = None) -> str:
    """onnxruntime's error as one line: the op, the node (`renamed` maps probe names back) and the reason, without
    onnxruntime's source path and failed condition."""
    text = " ".join(str(exc).split())
    found = re.search(r"running (\S+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if found is None:
        return text
    op, name, why = found.groups()
    return f"{op} node {(renamed or {}).get(name, name)!r}: {why.split(' was false. ', 1)[-1]}"


def _np_type(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
            "tensor(int8)": np.int8, "tensor(bool)": np.bool_}.get(ort_type, np.float32)


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            v = node.attrs[key]
            return np.asarray(v.values) if isinstance(v, gs.Constant) else np.asarray(v)
    return None


def _run_single_node(node: gs.Node, values: list, opset: int) -> list[np.ndarray]:
    """Evaluate one node on constant inputs with onnx's reference evaluator (numpy, any dtype)."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if i_t.name else "" for i, i_t in enumerate(node.inputs)]
    outs = [f"out{i}" for i in range(len(node.outputs))]
    attrs = {k: (onnx.numpy_helper.from_array(np.asarray(v.values)) if isinstance(v, gs.Constant) else v)
             for k, v in node.attrs.items()}
    onode = onnx.helper.make_node(node.op, names, outs, domain=node.domain or None, **attrs)
    feeds = {n: v for n, v in zip(names, values) if n}
    ev = ReferenceEvaluator(onnx.helper.make_model(
        onnx.helper.make_graph([onode], "fold", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                                                  for n in feeds], [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in outs]),
        opset_imports=[onnx.helper.make_opsetid("", opset)]))
    return ev.run(None, feeds)
