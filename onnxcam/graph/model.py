"""A model opened for explanation: its graph (onnx-graphsurgeon), static shapes, constant values and paths.

The view: tensors, producers, paths between tensors, and the default score and layer. Its static shapes come from
graph/shapes.py (inference and probes), its constant values from graph/fold.py, the model input's facts from
graph/inputs.py. The forward graph is never altered here: the explained model computes exactly what the deployed
model computes (autodiff/passes.pool_indices is the one, named, exception: a MaxPool's extra Indices output).
"""

from __future__ import annotations

import difflib
import logging
from collections import deque

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import InputError, LayerError, ModelError
from .fold import ConstantValues
from .inputs import BATCH, declared_shape, model_inputs, resolve_input_shape
from .load import detach_weights
from .quant import QUANTIZED_MOVES, carries_quantized
from .shapes import infer

log = logging.getLogger(__name__)

__all__ = ["BATCH", "ModelGraph", "default_opset"]

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
                 weights: dict | None = None, input_name: str | None = None):
        """proto: a model, or a skeleton (graph/load.py detach_weights) whose large weights are in `weights`.
        input_name: the input explained (an image among side inputs); None: the first fed input."""
        if weights is None:
            proto, weights = detach_weights(proto, owned=False)
        self.proto = proto
        self.weights = weights  # name -> numpy array of each large initializer (placeholders in the graph)
        self.opset = default_opset(proto)
        inputs = model_inputs(proto)
        if not inputs:
            raise ModelError("the model has no inputs")
        image = inputs[0] if input_name is None else next((i for i in inputs if i.name == input_name), None)
        if image is None:
            raise InputError(f"the model has no input named {input_name!r}; its inputs are "
                             f"{', '.join(repr(i.name) for i in inputs)}")
        self.input_name = image.name
        self.extra_inputs = [i.name for i in inputs if i is not image]
        declared = declared_shape(image)
        self.declared_input_shape = declared
        self.fixed_batch = isinstance(declared[0], int) if declared else False
        self.input_shape = resolve_input_shape(declared, input_shape, self.input_name)
        self.graph = gs.import_onnx(infer(proto, weights, self.input_name, self.input_shape))
        self.graph.toposort()
        self.tensors = self.graph.tensors()
        self._order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        self._constants = ConstantValues(self)
        self._at_batch: dict[int, ConstantValues] = {}

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
        return self._constants.value(t)

    def value_at_batch(self, t: gs.Tensor, batch: int) -> np.ndarray | None:
        """value(t) for a run of `batch` samples: the symbolic batch taken as that number in Shape nodes (None
        where t depends on the input's data)."""
        if batch not in self._at_batch:
            self._at_batch[batch] = ConstantValues(self, batch)
        return self._at_batch[batch].value(t)

    # ---- paths ---------------------------------------------------------------------------------------------
    def walk_back(self, starts, follow):
        """The producers behind the start tensors, nearest first, each once: breadth first, continuing from a node
        only through the inputs `follow(node)` returns (so a search stops at what it looks for by following nothing
        from it). The one backward search behind the task rules' "what is this score picked from" questions."""
        seen, todo = set(), deque(starts)
        while todo:
            node = self.producer(todo.popleft())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            yield node
            todo.extend(follow(node))

    def forward_reach(self, starts: list[gs.Tensor], stop: set[str] = frozenset()) -> set[str]:
        """Tensors that depend differentiably on the starts (integer results such as ArgMax indices do not). A
        tensor named in `stop` is reached but not followed (unless it is a start)."""
        seen, todo = {t.name for t in starts}, deque(starts)
        begun = {t.name for t in starts}
        while todo:
            t = todo.popleft()
            if t.name in stop and t.name not in begun:
                continue
            for node in t.outputs:
                if not _differentiable_input(node, t):
                    continue
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
                if inp.name and inp.name not in seen and _differentiable_input(node, inp):
                    seen.add(inp.name)
                    todo.append(inp)
        return seen

    def _differentiable_reach(self, end: gs.Tensor, stop: set[str] = frozenset()) -> set[str]:
        """Tensors the end depends on differentiably: backward_reach along the edges forward_reach follows, so
        that a float branch ending in integers (Faster R-CNN's Floor of box sizes -> level index) is no path. A
        tensor named in `stop` is reached but its producer is not followed."""
        seen, todo = {end.name}, deque([end])
        while todo:
            t = todo.popleft()
            node = self.producer(t) if t.name not in stop else None
            if node is None:
                continue
            k = next(i for i, o in enumerate(node.outputs) if o is t)
            for inp in node.inputs:
                moved = _moves_data(node, inp) and (k == 0 or node.op == "Split")
                if inp.name and inp.name not in seen and _differentiable_input(node, inp) \
                        and (moved or _carries_gradient(t, node)):
                    seen.add(inp.name)
                    todo.append(inp)
        return seen

    def path_nodes(self, starts: list[gs.Tensor], end: gs.Tensor, apart: bool = False
                   ) -> tuple[list[gs.Node], set[str]]:
        """Nodes on some path from a start tensor to the end tensor (topological order), and the tensors on it.
        apart: only paths that cross no other start (each start's gradient then comes from the part of the graph
        between it and the end that no other start lies on: a multi-scale detector's per-scale maps)."""
        stop = {t.name for t in starts} if apart else frozenset()
        on_path = self.forward_reach(starts) & self._differentiable_reach(end, stop)
        nodes = [n for n in self.graph.nodes if any(o.name in on_path for o in n.outputs)
                 and any(i.name in on_path for i in n.inputs) and not any(o.name in stop for o in n.outputs)]
        return nodes, on_path

    # ---- what to explain -----------------------------------------------------------------------------------
    def default_score(self, output: str | None = None, task: str = "auto") -> str:
        """The logits: the chosen float output (of several, the one the task rules pick: tasks/choose.py), or the
        input of a Softmax that produces it."""
        from ..tasks.choose import score_output

        outputs = [o for o in self.graph.outputs if o.dtype is not None and np.issubdtype(o.dtype, np.floating)]
        if output is not None:
            outputs = [o for o in self.graph.outputs if o.name == output]
            if not outputs:
                names = [o.name for o in self.graph.outputs]
                raise LayerError(f"the model has no output named {output!r}; its outputs are {names}")
        if not outputs:
            raise ModelError("the model has no floating-point output to explain")
        chosen = t = score_output(self, outputs, task)
        if chosen.name not in {o.name for o in self.graph.outputs}:
            return chosen.name  # a detector's pre-selection class scores: the numbers its detections report
        while (node := self.producer(t)) is not None:
            if node.op in _SOFTMAX:
                return node.inputs[0].name
            if node.op not in _PASS_THROUGH:
                break
            t = node.inputs[0]
        return chosen.name

    def default_layer(self, score: str, task: str = "auto") -> str:
        """The automatic layer for the task (auto: read from the score's shape), by tasks/choose.py's rules; the
        rule that picked it is kept in `layer_rule`."""
        from ..tasks.choose import layer

        choice = layer(self, score, task)
        self.layer_rule = choice.rule
        return choice.name

    def per_region(self, t: gs.Tensor) -> bool:
        """True for a tensor computed from a RoiAlign's output (a two-stage detector's box head, Faster R-CNN): its
        first axis counts the regions of one image, not images."""
        return any(n.op == "RoiAlign" for n in (self.producer(self.tensors[name]) for name in self.backward_reach(t))
                   if n is not None)

    def check_reaches(self, layer: str, score: str) -> None:
        if layer not in self.backward_reach(self.tensor(score)):
            near = [n for n in difflib.get_close_matches(layer, list(self.tensors), n=8, cutoff=0.5)
                    if n in self.backward_reach(self.tensor(score))]
            hint = f"; close matches that do: {near[:5]}" if near else ""
            raise LayerError(f"layer {layer!r} does not reach the score tensor {score!r}{hint}")


def _differentiable_input(node: gs.Node, t: gs.Tensor) -> bool:
    """False for RoiAlign's regions and batch indices: they say where to read, constants to the gradient as detectors
    detach their proposals (autodiff/rules/roi.py), so no path runs through them."""
    return node.op != "RoiAlign" or node.inputs[0] is t


def _moves_data(node: gs.Node, t: gs.Tensor) -> bool:
    """True when `node` moves the values of `t` (its data input; any input of a Concat) to its outputs."""
    return node.op in QUANTIZED_MOVES and (node.op == "Concat" or (bool(node.inputs) and node.inputs[0] is t))


def _carries_gradient(t: gs.Tensor, producer: gs.Node) -> bool:
    if producer.op == "DynamicQuantizeLinear":  # its scale and zero point are constants to straight-through rounding
        return t is producer.outputs[0]
    if t.dtype is None or carries_quantized(producer):
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


