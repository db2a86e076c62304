"""Hessian-vector products at a target layer, in standard ONNX ops: the gradient graph differentiated again.

ShapleyCAM (arXiv 2501.06261) weights each channel by the spatial mean of g - H A / 2, where g = dT/dA is the
target's gradient at the layer's activation A and H A = d<g, A>/dA with A held constant in the product (what
torch.autograd.grad(g, A, grad_outputs=A) computes). onnxcam's gradient graph is made of standard ops, so the same
reverse walk (autodiff/engine.py) can run over it a second time:

1. the target T is written into the graph after the score (linear: the score itself, weighted by a dense seed;
   softmax: Softmax(z); ReST: z + LogSoftmax(z), whose class-c entry is 2 z_c - logsumexp(z)), so that its
   curvature is differentiated too: a seed computed outside the graph from the logits would be a constant;
2. rewrite.build adds g = dT/dA (the first walk);
3. s = ReduceSum(g * stop(A)) per sample, where stop(A) is an Identity of A that the second walk treats as a
   constant (it is left off the walk's path), so that d s/dA follows only g's dependence on A: H A;
4. the walk runs again from s to A. One onnxruntime run then gives the logits, A, g and H A.

Where g does not depend on A at all (ReLU masks and a linear head: masks are casts of comparisons, which carry no
gradient), H A is identically zero and written as such. The ops the first walk emits need rules of their own: Abs's
gradient reads Sign (a zero derivative), MaxPool's and TopK's are ScatterElements, GatherND's and run-time Gathers'
and index writes' are ScatterND and GatherND, ScatterElements' and GatherElements' are each other. One without a
rule (the Scan of an LSTM's or GRU's gradient) is refused with UnsupportedOpError before anything runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import rewrite
from .autodiff.builder import Builder
from .autodiff.engine import backward
from .errors import InputError, LayerError, UnsupportedOpError
from .graph.model import ModelGraph

log = logging.getLogger(__name__)

KINDS = ("linear", "softmax", "rest")
TARGET = "onnxcam_hvp_target"  # the differentiated target T(score) for the softmax and ReST kinds
_FIRST = "onnxcam_grad/first/"  # the first walk's own names, moved aside so that the second walk's never collide


def hvp_name(layer: str) -> str:
    """The graph output holding H A for `layer`."""
    return f"onnxcam_hvp:{layer}"


@dataclass
class HvpModel:
    """The model that returns the logits, the layers' activations, gradients and Hessian-vector products."""

    model: onnx.ModelProto
    rewritten: rewrite.Rewritten  # the first walk's (its inputs: the dense seed, and `ranked` for a 2-D score)
    score: str  # the logits (the explainer's score): what Result.logits holds
    kind: str
    layers: list[str]
    weights: dict  # name -> array of the large initializers (placeholders in the model)

    def outputs(self) -> list[str]:
        """The names to fetch: the logits, then per layer its activation, gradient and H A."""
        rw = self.rewritten
        names = [self.score]
        for layer in self.layers:
            names += [rw.act_outputs[layer], rewrite.grad_name(layer), hvp_name(layer)]
        return names


def build_hvp(proto: onnx.ModelProto, weights: dict, input_shape: tuple, layers: list[str], score: str,
              kind: str = "linear") -> HvpModel:
    """The Hessian-vector-product model of `proto` (a skeleton whose large weights are `weights`) at `input_shape`.

    layers: tensor names (resolved); score: the logits' tensor name; kind: how the target reads the score
    (KINDS: a dense seed on the score itself, or one class of Softmax(score), or of ReST's z + LogSoftmax(z)).
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    with_target, target = _with_target(proto, score, kind)
    mg = ModelGraph(with_target, input_shape, weights)
    if kind != "linear" and len(mg.shape(mg.tensor(score)) or ()) != 2:
        raise LayerError(f"the {kind} target needs a 2-D (N, K) score; {score!r} has shape "
                         f"{mg.shape(mg.tensor(score))}")
    ranks = {layer: len(mg.shape(mg.tensor(layer)) or ()) for layer in layers}
    rw = rewrite.build(mg, layers, target, n_seeds=1, by_class=False, twice=True)
    second = _moved_aside(rw.model)
    stops = {layer: _append_product(second, layer, ranks[layer], mg.opset) for layer in layers}
    _expose_score(second, score)
    mg2 = ModelGraph(second, mg.input_shape, rw.weights)
    view = _Stopped(mg2, {stop for stop, _ in stops.values()})
    b = Builder(view)
    for layer in layers:
        _second_walk(b, mg2, layer, stops[layer][1])
    mg2.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(mg2.graph, do_type_check=False)
    model.ir_version = mg.proto.ir_version
    del model.opset_import[:]
    model.opset_import.extend(mg.proto.opset_import)
    rewrite.check_gradient(model, b.origins)
    rewrite._sign(model, b.origins)  # onnxruntime's refusal of a node at load then names the rule that emitted it
    used = {t.name for t in model.graph.initializer}
    return HvpModel(model, rw, score, kind, list(layers), {k: v for k, v in rw.weights.items() if k in used})


def _with_target(proto: onnx.ModelProto, score: str, kind: str) -> tuple[onnx.ModelProto, str]:
    """A copy of `proto` that computes the target T(score) of `kind`, and T's name (the score itself for linear)."""
    if kind == "linear":
        return proto, score
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    make = onnx.helper.make_node
    if kind == "softmax":
        out.graph.node.append(make("Softmax", [score], [TARGET], name=TARGET, axis=1))
    else:  # ReST: z_c - CE(z, c) = z_c + log softmax(z)_c
        out.graph.node.extend([make("LogSoftmax", [score], [f"{TARGET}/log_softmax"], name=f"{TARGET}/log_softmax",
                                    axis=1),
                               make("Add", [score, f"{TARGET}/log_softmax"], [TARGET], name=TARGET)])
    out.graph.output.append(onnx.helper.make_empty_tensor_value_info(TARGET))
    return out, TARGET


def _moved_aside(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the first walk's model whose emitted node, tensor and constant names are moved under _FIRST (and
    onnxcam_const_* to onnxcam_const_first_*): the second walk's Builder names its own from zero again."""
    out = onnx.ModelProto()
    out.CopyFrom(model)

    def moved(name: str) -> str:
        if name.startswith("onnxcam_grad/"):
            return _FIRST + name[len("onnxcam_grad/"):]
        if name.startswith("onnxcam_const_"):
            return "onnxcam_const_first_" + name[len("onnxcam_const_"):]
        return name

    def move(g: onnx.GraphProto) -> None:
        for node in g.node:
            node.name = moved(node.name)
            node.input[:] = [moved(i) for i in node.input]
            node.output[:] = [moved(o) for o in node.output]
            for attr in node.attribute:  # a Scan body (recurrent gradients) reads the walk's tensors by name
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    move(sub)
        for t in (*g.initializer, *g.sparse_initializer):
            t.name = moved(t.name)
        for vi in (*g.value_info, *g.input, *g.output):
            vi.name = moved(vi.name)

    move(out.graph)
    return out


def _append_product(model: onnx.ModelProto, layer: str, rank: int, opset: int) -> tuple[str, str]:
    """Append stop = Identity(A) and s = ReduceSum(g * stop) over every axis but the batch; (stop, s) names."""
    if rank < 2:
        raise LayerError(f"layer {layer!r} needs a batch axis and at least one more for a Hessian-vector product")
    base = f"onnxcam_hvp/{layer}"
    stop, product, s = f"{base}/stop", f"{base}/product", f"{base}/s"
    make = onnx.helper.make_node
    axes = list(range(1, rank))
    nodes = [make("Identity", [layer], [stop], name=stop),
             make("Mul", [rewrite.grad_name(layer), stop], [product], name=product)]
    if opset >= 13:
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(axes, np.int64), f"{base}/axes"))
        nodes.append(make("ReduceSum", [product, f"{base}/axes"], [s], name=s, keepdims=0))
    else:
        nodes.append(make("ReduceSum", [product], [s], name=s, keepdims=0, axes=axes))
    model.graph.node.extend(nodes)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(s))
    return stop, s


def _expose_score(model: onnx.ModelProto, score: str) -> None:
    """Make the logits a graph output (the first walk exposed the target T instead when T is not the score)."""
    if score not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(score))


class _Stopped:
    """A ModelGraph whose walk paths leave out the `stops` tensors: their values enter the gradient as constants."""

    def __init__(self, mg: ModelGraph, stops: set[str]):
        self._mg = mg
        self._stops = stops

    def __getattr__(self, name: str):
        return getattr(self._mg, name)

    def path_nodes(self, starts: list[gs.Tensor], end: gs.Tensor, apart: bool = False
                   ) -> tuple[list[gs.Node], set[str]]:
        nodes, on_path = self._mg.path_nodes(starts, end, apart)
        on_path = on_path - self._stops
        return [n for n in nodes if any(o.name in on_path for o in n.outputs)
                and any(i.name in on_path for i in n.inputs)], on_path


def _second_walk(b: Builder, mg: ModelGraph, layer: str, s_name: str) -> None:
    """Emit H A = d s/dA for one layer (zero where the gradient does not depend on A) as output hvp_name(layer)."""
    a, s = mg.tensor(layer), mg.tensor(s_name)
    if rewrite.grad_name(layer) not in mg.forward_reach([a]):
        log.debug("the gradient at %r does not depend on it: its Hessian-vector product is zero", layer)
        hvp = b.zeros_like(a)
    else:
        ones = b.op("ConstantOfShape", b.shape_of(s), value=gs.Constant("one", np.ones(1, b.dtype)))
        try:
            hvp = backward(b, [a], s, ones)[layer]
        except UnsupportedOpError as exc:
            raise UnsupportedOpError(f"ShapleyCAM differentiates the gradient graph at {layer!r} again: {exc}") \
                from None
        if not b.made(hvp):
            hvp = b.op("Identity", hvp)
    b.node, b.rule = None, "hessian.second walk"
    hvp.name = hvp_name(layer)
    hvp.dtype, hvp.shape = b.dtype, mg.shape(a)
    mg.graph.outputs.append(hvp)
