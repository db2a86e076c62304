"""Build the explainable model: the original graph, plus the target activations and their gradients as outputs.

Inputs added: `onnxcam_seed` (shaped like the score) weights the score of each sample and class; for a 2-D
score, `onnxcam_top1` (bool scalar) replaces the seed by each sample's one-hot top class inside the graph, so
the default target costs no extra run. Outputs added: the score, each layer's activation and gradient, and
the top class of each sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .autodiff.builder import Builder
from .autodiff.engine import backward
from .errors import LayerError
from .graph.load import with_weights
from .graph.model import ModelGraph

SEED = "onnxcam_seed"
TOP1 = "onnxcam_top1"
TOP1_CLASS = "onnxcam_top1_class"


def grad_name(layer: str) -> str:
    return f"onnxcam_grad:{layer}"


def act_name(layer: str) -> str:
    return f"onnxcam_act:{layer}"


@dataclass
class Rewritten:
    model: onnx.ModelProto
    input_name: str
    score: str
    layers: list[str]
    score_shape: tuple
    has_top1: bool
    fixed_batch: bool
    original_outputs: list[str]
    weights: list  # the large initializers, held apart from the (placeholder-carrying) model

    def full_model(self) -> onnx.ModelProto:
        """The rewritten model with its weights inline, e.g. to save it."""
        return with_weights(self.model, self.weights)

    def initializer_arrays(self) -> dict:
        return {t.name: onnx.numpy_helper.to_array(t) for t in self.weights}


def resolve_score(mg: ModelGraph, score: str | None, output: str | None = None) -> str:
    if score is None:
        return mg.default_score(output)
    t = mg.tensor(score)
    if t.dtype is not None and not np.issubdtype(np.dtype(t.dtype), np.floating):
        raise LayerError(f"score tensor {score!r} is {np.dtype(t.dtype)}, not floating point")
    return score


def resolve_layers(mg: ModelGraph, layers: list[str] | None, score: str) -> list[str]:
    if layers is None:
        return [mg.default_layer(score)]
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise LayerError("layers is empty; give at least one tensor name, or None for the automatic choice")
    for name in layers:
        mg.tensor(name)
        mg.check_reaches(name, score)
    return list(dict.fromkeys(layers))


def build(mg: ModelGraph, layers: list[str], score: str, *, guided: bool = False) -> Rewritten:
    graph = mg.graph
    score_t = mg.tensor(score)
    score_shape = mg.shape(score_t)
    dtype = np.float32
    seed = gs.Variable(SEED, dtype=dtype, shape=list(score_shape) if score_shape else None)
    graph.inputs.append(seed)
    b = Builder(mg, dtype, guided=guided)
    original_outputs = [o.name for o in graph.outputs]
    extra_outputs = []
    has_top1 = score_shape is not None and len(score_shape) == 2 and isinstance(score_shape[1], int)
    if has_top1:
        top1 = gs.Variable(TOP1, dtype=np.bool_, shape=[])
        graph.inputs.append(top1)
        s = score_t if score_t.dtype == dtype else b.cast(score_t, dtype)
        best = b.op("ArgMax", s, axis=1, keepdims=1)
        onehot = b.mask(b.op("Equal", best, b.ints(np.arange(score_shape[1]))))
        seed_used = b.op("Where", top1, onehot, seed)
        extra_outputs.append(_named(b, b.squeeze(best, [1]), TOP1_CLASS, np.int64))
    else:
        seed_used = seed
    if score_t.dtype is not None and np.dtype(score_t.dtype) != np.dtype(dtype):
        seed_used = b.cast(seed_used, score_t.dtype)
    targets = [mg.tensor(name) for name in layers]
    grads = backward(b, targets, score_t, seed_used)
    if score not in original_outputs:
        extra_outputs.append(_named(b, score_t, score, None, copy=False))
    for t in targets:
        extra_outputs.append(_named(b, t, act_name(t.name), t.dtype))
        extra_outputs.append(_named(b, grads[t.name], grad_name(t.name), dtype))
    graph.outputs.extend(extra_outputs)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = mg.proto.ir_version
    del model.opset_import[:]
    model.opset_import.extend(mg.proto.opset_import)
    del model.metadata_props[:]
    model.metadata_props.extend(mg.proto.metadata_props)
    used = {t.name for t in model.graph.initializer}
    weights = [t for name, t in mg.weights.items() if name in used]
    return Rewritten(model, mg.input_name, score, layers, score_shape, has_top1, mg.fixed_batch, original_outputs,
                     weights)


def _named(b: Builder, t: gs.Tensor, name: str, dtype, copy: bool = True) -> gs.Variable:
    """Expose tensor `t` as a graph output called `name` (an Identity, so graph inputs can be exposed too)."""
    if not copy:
        t.dtype = t.dtype or np.float32
        return t
    out = gs.Variable(name, dtype=dtype or t.dtype)
    b.graph.nodes.append(gs.Node("Identity", name=f"onnxcam_out/{name}", inputs=[t], outputs=[out]))
    return out
