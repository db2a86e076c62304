"""Cutting a model at a tensor: the part after it, as a model of its own whose first input is that tensor.

Ablation-CAM changes a layer's activations and reads the score again. Only the nodes between the layer and the
score depend on those activations; the rest of the model gives the same values for every ablation, so it runs once.
The tail keeps every node that is an ancestor of the output and depends on the layer, plus the constant nodes
(those reading no graph input) it needs; any other tensor it reads (a skip connection that bypasses the layer, the
model input itself) becomes one more input, computed once by the whole model and fed again with each batch.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from ..errors import LayerError

log = logging.getLogger(__name__)


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor a node reads, including the outer names its subgraphs (If, Loop, Scan) use."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            names |= _outer_reads(g)
    return names


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    inner = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    inner |= {o for n in graph.node for o in n.output}
    return {name for n in graph.node for name in _reads(n)} - inner


def tail_nodes(proto: onnx.ModelProto, tensor: str, output: str) -> tuple[list[onnx.NodeProto], list[str]]:
    """(the nodes computing `output` from `tensor`, in graph order; the tensors they read that the rest of the model
    computes: `tensor` first, then the others). LayerError when `output` does not depend on `tensor`."""
    graph = proto.graph
    held = {t.name for t in graph.initializer}
    inputs = {i.name for i in graph.input} - held
    varies, from_layer = set(inputs), {tensor}  # tensors that depend on a graph input / on the layer
    for node in graph.node:
        reads = _reads(node)
        if reads & varies:
            varies.update(node.output)
        if reads & from_layer:
            from_layer.update(node.output)
    if output not in from_layer:
        raise LayerError(f"tensor {output!r} does not depend on layer {tensor!r}: there is nothing to ablate")
    needed, kept = {output}, []
    for node in reversed(graph.node):
        if not needed.intersection(node.output) or tensor in node.output:  # the layer itself is fed
            continue
        produced = set(node.output)
        if produced & from_layer or not produced & varies:  # after the layer, or a constant
            kept.append(node)
            needed |= _reads(node)
    kept.reverse()
    produced = {o for n in kept for o in n.output} | held
    fed = sorted(name for name in needed if name not in produced and name != tensor)
    return kept, [tensor, *fed]


def tail_model(proto: onnx.ModelProto, tensor: str, output: str, examples: dict[str, np.ndarray],
               batch: bool = True) -> tuple[onnx.ModelProto, list[str]]:
    """The tail (see tail_nodes) as a model: inputs = `tensor` and the other fed tensors, typed like `examples`
    (name -> one run's value; the batch axis symbolic when `batch`), output = `output`. The initializers are those
    of `proto` that the tail reads (placeholders stay placeholders). Returns (model, its input names)."""
    nodes, feeds = tail_nodes(proto, tensor, output)
    missing = [name for name in feeds if name not in examples]
    if missing:
        raise LayerError(f"cutting at {tensor!r}: no value for the tensors {missing} the rest of the model reads")
    reads = set().union(*(_reads(n) for n in nodes))
    inits = [t for t in proto.graph.initializer if t.name in reads]
    inputs = []
    for name in feeds:
        value = examples[name]
        dims = list(value.shape)
        if batch and dims:
            dims[0] = "N"
        inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), dims))
    out = helper.make_empty_tensor_value_info(output)  # its type inferred by onnxruntime
    known = {vi.name: vi for vi in proto.graph.value_info}
    known.update({o.name: o for o in proto.graph.output})
    if output in known:
        out = known[output]
    graph = helper.make_graph(nodes, f"{proto.graph.name}_after_{tensor}", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    model.functions.extend(proto.functions)
    log.debug("cut at %s: %d of %d nodes, inputs %s", tensor, len(nodes), len(proto.graph.node), feeds)
    return model, feeds
