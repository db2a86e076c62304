"""Build the explainable model: the original graph, plus the target activations and their gradients as outputs.

Inputs added, in one of two forms (per-region scores: a third, below):
- dense: `onnxcam_seed`, shaped (N, S, *score.shape[1:]), holds S weightings of the score per sample (any
  target); for a 2-D score, `onnxcam_ranked` (bool scalar) replaces them by one-hots of each sample's S top classes.
- by class (2-D scores): `onnxcam_classes` (N, S) int64 names S classes per sample, or `onnxcam_ranked` picks
  each sample's S top classes inside the graph, so the default target costs no extra run. The seed is then known
  to be one-hot: a linear head's backward takes the class rows of its weight matrix (a Gather) instead of
  multiplying the seed with the whole matrix. Outputs added: the score, each layer's activation, its S
gradients (N, S, *activation.shape[1:]; with S = 1 just the activation's shape, which saves onnxruntime a copy),
and the S top classes of each sample.

Per-region scores (a two-stage detector's (R, C), one image's regions): R is the run's (its proposals), unknown
before it, so each seed comes as its K nonzero rows, `onnxcam_rows` (S, K, C), at the regions `onnxcam_regions`
(S, K) int64, and is laid out on the run's R regions inside the graph (a row beyond them weighs nothing: the
Explainer checks the seed against the run). The score is exposed as (1, R, C).

S backward copies share one forward pass: explaining the top-5 classes costs one forward and five backward
passes through the part of the graph after the layer (often just the head), not five inferences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .autodiff.builder import Builder
from .autodiff.engine import backward
from .autodiff.passes import (
    SEED_PASSES,
    blocked_complements,
    blocked_hard_swish,
    crop_seed_windows,
    fold_crops,
    skip_zero_slabs,
    split_conv_channels,
    take_class_rows,
)
from .autodiff.passes_shared import share_forward
from .errors import InternalError, LayerError
from .graph import names
from .graph.inputs import fmt_shape
from .graph.load import is_placeholder
from .graph.model import ModelGraph

SEED = "onnxcam_seed"
CLASSES = "onnxcam_classes"
RANKED = "onnxcam_ranked"
TOP_CLASSES = "onnxcam_top_classes"
SCORE_VIEW = "onnxcam_score"  # a score without batch axis (per-region scores), exposed as (1, ...)
REGIONS = "onnxcam_regions"  # per-region scores' seeds: (S, K) int64 regions of their nonzero rows
ROWS = "onnxcam_rows"  # and those rows, (S, K, C)
ORIGIN = "onnxcam_origin"  # the key of the emitting node and rule in a gradient node's doc_string (runtime.py)


def grad_name(layer: str) -> str:
    return f"onnxcam_grad:{layer}"


def act_name(layer: str) -> str:
    return f"onnxcam_act:{layer}"


@dataclass
class Rewritten:
    """The explainable model rewrite.build makes: the original graph with the layers' activations and the gradient of
    the seeded score with respect to them as extra outputs, standard ONNX ops only.

    model: the rewritten skeleton (large weights as placeholders; `weights` holds their values until the Explainer's
    session has its own copy). Inputs besides the model's own: the seed (SEED, dense) or, when by_class, the class
    indices (CLASSES) and whether to rank them in the graph (RANKED, giving TOP_CLASSES). Outputs: the model's own
    (original_outputs), the score, each layer's activation (act_outputs[layer]) and gradient (grad_name(layer)),
    (N, n_seeds, ...) when n_seeds > 1. score_shape: the score's static shape (batch symbolic); fixed_batch: the
    model fixes its batch. regions: the score is per-region, (1, R, C) with R the run's (score_shape holds the
    probe's R); its seeds are the REGIONS and ROWS inputs.
    """

    model: onnx.ModelProto
    input_name: str
    score: str
    layers: list[str]
    score_shape: tuple
    has_ranking: bool
    n_seeds: int
    fixed_batch: bool
    original_outputs: list[str]
    weights: dict  # name -> numpy array of the large initializers (placeholders in the model)
    act_outputs: dict  # layer -> the graph output holding its activation
    by_class: bool = False  # seeds given as class indices (CLASSES/RANKED inputs), not as a dense SEED
    regions: bool = False  # per-region scores: seeds given as their nonzero rows (REGIONS/ROWS inputs)
    shared: bool = False  # the seed's batch is S seeds of one sample (one forward): passes_shared.py

    def initializer_arrays(self) -> dict:
        """The weights to give onnxruntime (Explainer empties them once its session holds a copy)."""
        return self.weights


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
    # Module paths and Keras layer names answer too (graph/names.py).
    layers = [names.resolve(mg.proto, name, mg.tensors) for name in layers]
    for name in layers:
        mg.check_reaches(name, score)
    return list(dict.fromkeys(layers))


def build(mg: ModelGraph, layers: list[str], score: str, *, guided: bool = False, n_seeds: int = 1,
          by_class: bool = False, twice: bool = False, apart: bool = False, shared: bool = False) -> Rewritten:
    """by_class: take the seeds as class indices (a 2-D score only; else the dense seed input is built). twice: the
    gradient graph will be differentiated again (hessian.py): without the passes whose nodes have no rule. apart:
    each layer's gradient along the paths to the score that cross no other layer (a multi-scale detector's
    per-scale layers, tasks/choose.py scale_layers: a detection's gradient is then non-zero at its own scale's
    layer only, and exact there). shared: the seed's batch holds S seeds of one sample, whose forward runs once
    (autodiff/passes_shared.py; LayerError where the graph cannot share it)."""
    graph = mg.graph
    score_t = mg.tensor(score)
    score_shape = mg.shape(score_t)
    if not score_shape:
        raise LayerError(f"the score tensor {score!r} must have a batch axis; its shape is {score_shape}")
    if score_t.dtype is not None and not np.issubdtype(np.dtype(score_t.dtype), np.floating):
        raise LayerError(f"the score tensor {score!r} is {_type_name(score_t.dtype)}, not floating point: "
                         "it has no gradient")
    one_image = len(score_shape) == 2 and mg.per_region(score_t)  # Faster R-CNN's (R, C): no batch axis
    if one_image:
        score_shape = _one_image_shape(mg, score, score_shape)
        if twice:
            raise LayerError(f"the score tensor {score!r} holds per-region scores, seeded on each run's own regions: "
                             "second derivatives (ShapleyCAM) take a dense seed of fixed shape and are not built for "
                             "them; use a first-order method (GradCAM, HiResCAM, ...)")
    dtype = np.float32
    if apart and twice:
        raise LayerError("layers apart (each layer's gradient crossing no other layer) are not built for second "
                         "derivatives (ShapleyCAM); give one layer, or layers whose gradients add up")
    b = Builder(mg, dtype, guided=guided, apart=apart)
    if twice:
        b.passes -= SEED_PASSES
    original_outputs = [o.name for o in graph.outputs]
    extra_outputs = []
    has_ranking = len(score_shape) == 2 and isinstance(score_shape[1], int)
    by_class = by_class and has_ranking
    if has_ranking:
        if n_seeds > score_shape[1]:
            raise LayerError(f"asked for {n_seeds} targets per sample, but the score has {score_shape[1]} classes")
        ranked = gs.Variable(RANKED, dtype=np.bool_, shape=[])
        k = {"k": n_seeds} if b.opset < 10 else {}
        _, top = b.op("TopK", score_t, None if k else b.ints([n_seeds]), axis=1, outputs=2, **k)  # (N, S) classes
        extra_outputs.append(_renamed(top, TOP_CLASSES, np.int64, [score_shape[0], n_seeds]))
    if one_image:
        seed_of = _region_seeds(b, score_t, score_shape[2], n_seeds)
    elif by_class:
        given = gs.Variable(CLASSES, dtype=np.int64, shape=[score_shape[0], n_seeds])
        graph.inputs.extend([given, ranked])
        classes = b.op("Where", ranked, top, given)
        seed_of = [b.one_hot(b.op("Gather", classes, b.ints(i), axis=1), score_shape[1]) for i in range(n_seeds)]
    else:
        seeds = seed_input = gs.Variable(SEED, dtype=dtype, shape=[score_shape[0], n_seeds, *score_shape[1:]])
        graph.inputs.append(seeds)
        if has_ranking:
            graph.inputs.append(ranked)
            onehot = b.mask(b.op("Equal", b.unsqueeze(top, [2]), b.ints(np.arange(score_shape[1]))))
            seeds = b.op("Where", ranked, onehot, seeds)
        # one seed: a Squeeze, which onnxruntime runs in place (a Gather copied it: 1 ms for a segmenter's
        # (1, 21, 320, 320) map)
        seed_of = ([b.squeeze(seeds, [1])] if n_seeds == 1
                   else [b.op("Gather", seeds, b.ints(i), axis=1) for i in range(n_seeds)])
    if shared:
        _check_shareable(mg, score, one_image or by_class or has_ranking, n_seeds, twice)
    targets = [mg.tensor(name) for name in layers]
    per_seed = [backward(b, targets, score_t, seed) for seed in seed_of]
    exposed = _expose(b, ([] if one_image else [score_t]) + targets, set(original_outputs))
    if one_image:  # the score as (1, R, C), one image's like every other score
        extra_outputs.append(_renamed(b.unsqueeze(score_t, [0]), SCORE_VIEW, score_t.dtype or dtype,
                                      [1, "regions", score_shape[2]]))
        score = SCORE_VIEW
    act_outputs = {t.name: act_name(t.name) if not t.inputs else t.name for t in targets}
    taken = set()
    for t in targets:
        shape = mg.shape(t)
        if n_seeds == 1:
            grad, grad_shape = per_seed[0][t.name], shape
            if id(grad) in taken or not b.made(grad):  # shared with another layer (an Identity between them)
                grad = b.op("Identity", grad)
            taken.add(id(grad))
        else:
            grad = b.op("Concat", *[b.unsqueeze(grads[t.name], [1]) for grads in per_seed], axis=1)
            grad_shape = None if shape is None else [shape[0], n_seeds, *shape[1:]]
        extra_outputs.append(_renamed(grad, grad_name(t.name), dtype, grad_shape))
    graph.outputs.extend(exposed + extra_outputs)
    take_class_rows(b)
    fold_crops(b)
    split_conv_channels(b)
    crop_seed_windows(b)
    skip_zero_slabs(b)
    blocked_complements(b)
    blocked_hard_swish(b)
    if shared:
        share_forward(b, seed_input)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = mg.proto.ir_version
    del model.opset_import[:]
    model.opset_import.extend(mg.proto.opset_import)
    check_gradient(model, b.origins)
    _sign(model, b.origins)
    _forget_data_dependent_shapes(model)
    del model.metadata_props[:]
    model.metadata_props.extend(mg.proto.metadata_props)
    used = {t.name for t in model.graph.initializer}
    weights = {name: a for name, a in mg.weights.items() if name in used}
    return Rewritten(model, mg.input_name, score, layers, score_shape, has_ranking, n_seeds, mg.fixed_batch,
                     original_outputs, weights, act_outputs, by_class, one_image, shared)


# Ops whose outputs' sizes depend on the input's values (a detector's proposals per FPN level, its NMS results)
_DATA_SIZED = {"NonZero", "NonMaxSuppression", "Compress", "Unique", "If", "Loop"}


def _forget_data_dependent_shapes(model: onnx.ModelProto) -> None:
    """Drop the sizes of the tensors computed from a data-sized op's outputs: the probe (graph/shapes.py) measured
    them on one input, and onnxruntime, taking them as facts, folds Shape nodes into wrong constants for any input
    whose regions split otherwise (seen as a ScatterElements refusing its indices)."""
    graph = model.graph
    sized = {o for n in graph.node if n.op_type in _DATA_SIZED and not _gradient_if(n) for o in n.output}
    for n in graph.node:  # topological order: one pass reaches everything computed from them
        if any(i in sized for i in n.input) or (_gradient_if(n) and _outer_reads(n) & sized):
            sized.update(n.output)
    for vi in graph.value_info:
        if vi.name in sized:
            vi.type.tensor_type.ClearField("shape")


def _region_seeds(b: Builder, score_t: gs.Tensor, classes: int, n_seeds: int) -> list:
    """The seeds of per-region scores (R, C), R being the run's: seed s holds row ROWS[s, k] (C weights) at region
    REGIONS[s, k] and zeros elsewhere. Each region looks its row up (the first of equal regions), so a one-hot
    seed costs a (1, R) comparison and a dense one R x K, never a product with the rows; a region outside 0..R-1
    matches none (the Explainer checks the seed against the run)."""
    regions = gs.Variable(REGIONS, dtype=np.int64, shape=[n_seeds, "rows"])
    rows = gs.Variable(ROWS, dtype=b.dtype, shape=[n_seeds, "rows", classes])
    b.graph.inputs.extend([regions, rows])
    # one zero row more, at no region: ArgMax needs at least one row
    regions = b.op("Concat", regions, b.ints(np.full((n_seeds, 1), -1)), axis=1)
    rows = b.op("Concat", rows, b.const(np.zeros((n_seeds, 1, classes), b.dtype)), axis=1)
    count = b.squeeze(b.slice(b.shape_of(score_t), [0], [1], [0]), [0])
    every = b.op("Range", b.ints(0), count, b.ints(1))  # (R,)
    seeds = []
    for s in range(n_seeds):
        hit = b.mask(b.op("Equal", b.unsqueeze(b.op("Gather", regions, b.ints(s), axis=0), [1]), every))  # (K, R)
        row = b.op("ArgMax", hit, axis=0, keepdims=0)  # (R,): each region's row, 0 where none is (masked below)
        found = b.unsqueeze(b.reduce("ReduceMax", hit, [0], keepdims=False), [1])  # (R, 1)
        given = b.op("Gather", rows, b.ints(s), axis=0)
        seeds.append(b.op("Mul", b.op("Gather", given, row, axis=0), found))
        b.region_seeds[seeds[-1].name] = (row, found, given)  # the seeded rows alone: passes_regions.region_rows
    return seeds


def _check_shareable(mg: ModelGraph, score: str, seeded_otherwise: bool, n_seeds: int, twice: bool) -> None:
    """LayerError unless the seeds of one forward can be a dense seed's batch (passes_shared.py)."""
    if mg.fixed_batch:
        raise LayerError(f"input {mg.input_name!r} fixes its batch: the seeds cannot be a batch of their own")
    if seeded_otherwise or n_seeds != 1 or twice:
        raise LayerError(f"the score {score!r} is seeded by class or by region, or several seeds per sample, or "
                         "twice differentiated: one forward for several seeds takes one dense seed per sample")


def _one_image_shape(mg: ModelGraph, score: str, shape: tuple) -> tuple:
    """(1, R, C) for the per-region scores (R, C) of a two-stage detector, which come from the regions of one image:
    its input must then hold one image."""
    if not (mg.fixed_batch and mg.input_shape[0] == 1):
        raise LayerError(f"the score tensor {score!r} holds per-region scores {tuple(shape)} computed from RoiAlign's "
                         f"regions, with no batch axis: the model's input must be one image (a fixed batch of 1), "
                         f"but {mg.input_name!r} is {fmt_shape(mg.input_shape)}")
    return (1, *shape)


def check_gradient(model: onnx.ModelProto, origins: dict) -> None:
    """Check the nodes onnxcam added as onnxruntime will at load (ONNX's checker, strict type and shape inference).

    A failure there is onnxcam's bug, not the model's: InternalError names the forward node and the rule that
    emitted the bad node (`origins`: gradient node name -> (forward node, op, rule), from the Builder). Only the
    gradient part is checked, its forward inputs declared with their inferred types: the forward graph is the
    user's, and onnxruntime judges it on its own.
    """
    part = _gradient_part(model, origins)
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = part.ir_version
    ctx.opset_imports = {imp.domain: imp.version for imp in part.opset_import}
    for node in part.graph.node:  # node by node: graph inputs of unknown shape are fine here, not in check_model
        if any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
            continue  # a Scan body reads outer tensors, which a lone node cannot see: shape inference checks it below
        try:
            onnx.checker.check_node(node, ctx)
        except onnx.checker.ValidationError as exc:
            raise InternalError(f"node {node.name!r}: {_one_line(exc)}", *origins[node.name]) from None
    try:
        onnx.shape_inference.infer_shapes(part, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        message = _one_line(exc)
        named = [name for name in origins if name in message]  # the first named (the cause), longest at a tie
        origin = origins[min(named, key=lambda n: (message.index(n), -len(n)))] if named else (None, None, None)
        raise InternalError(message, *origin) from None


def _sign(model: onnx.ModelProto, origins: dict) -> None:
    """Write into each emitted node's doc_string which forward node and rule emitted it, so that a node onnxruntime
    still refuses at load (a kernel it lacks) is reported as onnxcam's InternalError (runtime.session)."""
    for node in model.graph.node:
        if node.name in origins:
            node.doc_string = json.dumps({ORIGIN: dict(zip(("node", "op", "rule"), origins[node.name]))})


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _gradient_if(node: onnx.NodeProto) -> bool:
    """An If of skip_zero_slabs: its outputs are shaped like forward tensors (zeros or the branch's gradients),
    data-sized only when what its branches read is."""
    return node.op_type == "If" and node.name.startswith("onnxcam_grad/")


def _outer_reads(node: onnx.NodeProto) -> set:
    """Names that the subgraphs of a node (a Scan body) read from the enclosing graph."""
    reads = set()
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            local = {i.name for i in a.g.input} | {t.name for t in a.g.initializer} | {o for n in a.g.node
                                                                                      for o in n.output}
            reads |= {i for n in a.g.node for i in (*n.input, *_outer_reads(n)) if i and i not in local}
    return reads


def _gradient_part(model: onnx.ModelProto, origins: dict) -> onnx.ModelProto:
    """The nodes of `model` named in `origins`, as a model whose inputs are the forward tensors they read.

    Nodes that depend on a forward tensor of unknown type (an output of a custom-domain op) are left out: there is
    nothing to check them against, and onnxruntime's own refusal of them still names the rule (runtime.py).
    """
    graph = model.graph
    typed = {vi.name: vi for vi in (*graph.input, *graph.value_info, *graph.output) if vi.type.tensor_type.elem_type}
    inits = {t.name: t for t in graph.initializer}
    nodes, made, untyped, inputs, consts = [], set(), set(), {}, {}
    for n in graph.node:
        if n.name not in origins:
            continue
        reads = [i for i in (*n.input, *_outer_reads(n)) if i and i not in made]
        if any(i in untyped or (i not in inits and i not in typed) for i in reads):
            untyped.update(n.output)
            continue
        for name in reads:
            t = inits.get(name)
            if t is None:
                inputs[name] = typed[name]
            elif is_placeholder(t):  # a large weight, held outside the proto: its type is all the check needs
                inputs[name] = onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims))
            else:
                consts[name] = t
        nodes.append(n)
        made.update(n.output)
    outputs = [o for o in graph.output if o.name in made]
    part = onnx.helper.make_model(onnx.helper.make_graph(nodes, "onnxcam_gradient", list(inputs.values()), outputs,
                                                         list(consts.values())), opset_imports=model.opset_import)
    part.ir_version = max(model.ir_version, 4)  # IR 3 wants every initializer listed as an input too
    return part


def _type_name(dtype) -> str:
    return onnx.TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def _expose(b: Builder, tensors: list[gs.Tensor], already: set[str]) -> list[gs.Tensor]:
    """Forward tensors to add as graph outputs under their own names (once each).

    A node's output is listed as it is: an Identity in front of it can make onnxruntime's EliminateIdentity
    pass drop a tensor that other nodes still read (seen on a tf2onnx MobileNetV2). A graph input (the
    model input, for saliency) cannot be an output too: it gets an Identity named act_name(input).
    """
    exposed = []
    for t in tensors:
        if t.name in already:
            continue
        already.add(t.name)
        if not t.inputs:
            out = gs.Variable(act_name(t.name), dtype=t.dtype)
            b.graph.nodes.append(gs.Node("Identity", name=f"onnxcam_out/{t.name}", inputs=[t], outputs=[out]))
            t = out
        t.dtype = t.dtype or np.float32
        exposed.append(t)
    return exposed


def _renamed(t: gs.Variable, name: str, dtype, shape) -> gs.Variable:
    """A tensor the builder made, renamed to be a graph output (typed and shaped, as a valid model needs)."""
    t.name = name
    t.dtype = dtype
    t.shape = shape
    return t
