"""What to explain by default, per task: the score output and the automatic layer, each with the rule that chose it.

Tasks come from the score's shape (or are given): (N, K) classify; (N, K, H, W) maps that scale like the input
segment; a recognised YOLO head (detect.py) detect. The layer rules (issue 14, "the automatic choice must be
meaningful"): never the score itself, never a tensor whose gradient is identically zero for the target (YOLOv8's
DFL branch, a ViT's last per-token norm), laid out so that the map has the input's orientation (a permuted
(N, W, H, C) tensor as in MTCNN's R/O-Net is skipped), and where practitioners put it: the last map feeding every
scale of a detector (the neck), the last block's norm input of a vision transformer, the backbone's last stage of a
segmenter. ModelGraph.default_score / default_layer call score_output / layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import InputError, LayerError
from . import detect, ocr

log = logging.getLogger(__name__)

TASK_CHOICES = ("auto", "classify", "detect", "segment", "ocr")
# Ops that keep a map's layout: walking back through them finds where its axes were made.
_ELEMENTWISE = {"Relu", "PRelu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Tanh", "Elu", "Selu",
                "Mish", "Gelu", "Softplus", "Identity", "Dropout", "Cast", "Add", "Mul", "Sub", "Div",
                "QuantizeLinear", "DequantizeLinear"}
# Ops whose output is NCHW by the ONNX spec: the origin of a map's axes.
_NCHW = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "BatchNormalization", "InstanceNormalization",
         "QLinearConv", "FusedConv", "LpPool"}
_SCORE_OPS = {"Softmax", "LogSoftmax", "Sigmoid"}
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Cast", "Transpose", "Unsqueeze"}


@dataclass(frozen=True)
class Choice:
    name: str
    rule: str


# ---- the task ------------------------------------------------------------------------------------------------
def input_hw(mg) -> tuple[int, int] | None:
    """The input's static (H, W) (NCHW unless the channels sit last), else None."""
    shape = mg.input_shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        return None
    nhwc = shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4)
    return (shape[1], shape[2]) if nhwc else (shape[2], shape[3])


def task_of(mg, score: str, strict: bool = False, decode: str | None = None, classes: int | None = None) -> str:
    """classify / detect / segment from the score's shape. strict: an InputError naming the shape and task= when
    none fits (else "classify", whose rules are the generic ones)."""
    shape = mg.shape(mg.tensor(score))
    hw = input_hw(mg)
    if (selection := selection_of(mg)) is not None and selection.score == score:
        return "detect"  # before the (N, K) rule: Faster R-CNN's selected-from scores are (R, C)
    if shape is not None and len(shape) == 2:
        return "classify"
    if ocr.is_recognizer(mg, score):
        return "ocr"
    if shape is not None and len(shape) == 4 and hw and _scales(shape[2:], hw):
        return "segment"
    if shape is not None and len(shape) == 3 and hw:
        try:
            detect.recognise(shape, hw, classes, decode, score)
            return "detect"
        except InputError as exc:
            if strict:
                raise InputError(f"cannot tell the task of output {score!r}: {exc}; or give task='classify', "
                                 "'detect', 'segment' or 'ocr'") from None
    if strict:
        size = f"a {hw[0]}x{hw[1]}" if hw else "an unsized"
        raise InputError(f"cannot tell the task from output {score!r} of shape {_fmt(shape)} for {size} input: "
                         "it is no (N, K) class scores, (N, K, H, W) maps, YOLO detection head or recognizer's "
                         "sequence scores; give task='classify', 'detect', 'segment' or 'ocr'")
    return "classify"


def _scales(hw: tuple, input_hw_: tuple) -> bool:
    """True when (h, w) is the input's (H, W) divided by one stride (within rounding), both dims above 1."""
    (h, w), (height, width) = hw, input_hw_
    if not (isinstance(h, int) and isinstance(w, int) and 1 < h <= height and 1 < w <= width):
        return False
    sh, sw = height / h, width / w
    return abs(sh - sw) <= 0.15 * max(sh, sw)


# ---- the score -----------------------------------------------------------------------------------------------
def score_output(mg, outputs: list, task: str = "auto") -> gs.Tensor:
    """The output to explain among the model's float outputs: the one the task reads (a recognised detection
    head, segmentation maps, class scores), then one behind a Softmax/Sigmoid, never a box regression (4 numbers
    per position) while another output is left, else the first."""
    if task in ("auto", "detect") and (selection := selection_of(mg, strict=True)) is not None \
            and any(o.name == selection.scores for o in outputs):  # unless another output was named
        log.info("explaining %r, the class scores the detections %r were selected from", selection.score,
                 selection.scores)
        return mg.tensor(selection.score)
    if len(outputs) == 1:
        return outputs[0]
    hw = input_hw(mg)
    ranked = sorted(range(len(outputs)), key=lambda i: (_task_rank(mg, outputs[i], task, hw),
                                                        not _behind_score_op(mg, outputs[i]),
                                                        _box_like(mg.shape(outputs[i])), i))
    chosen = outputs[ranked[0]]
    if chosen is not outputs[0]:
        log.info("explaining output %r (the class scores by the task rules), not the first output %r", chosen.name,
                 outputs[0].name)
    return chosen


def _task_rank(mg, t: gs.Tensor, task: str, hw) -> int:
    shape = mg.shape(t)
    if shape is None:
        return 3
    is_detect = len(shape) == 3 and hw is not None and _recognised(shape, hw, t.name)
    is_segment = len(shape) == 4 and hw is not None and _scales(shape[2:], hw)
    if task == "detect":
        return 0 if is_detect else 1
    if task == "segment":
        return 0 if is_segment else 1
    if task == "classify":
        return 0 if len(shape) == 2 else 1
    return 0 if is_detect else 1 if len(shape) == 2 or is_segment else 2


def _recognised(shape, hw, name) -> bool:
    try:
        detect.recognise(shape, hw, name=name)
        return True
    except InputError:
        return False


def _behind_score_op(mg, t: gs.Tensor) -> bool:
    while (node := mg.producer(t)) is not None:
        if node.op in _SCORE_OPS:
            return True
        if node.op not in _PASS_THROUGH and node.op != "Concat":
            return False
        t = node.inputs[0]
    return False


def _box_like(shape) -> bool:
    """4 numbers per position: (N, 4), (N, 4, h, w), (N, A, 4)."""
    if shape is None or len(shape) < 2:
        return False
    return shape[1] == 4 if len(shape) in (2, 4) else shape[-1] == 4


# ---- detectors exported whole (torchvision): boxes, scores, labels after NMS ---------------------------------------
# Ops that only pick, reorder or reshape values: a post-NMS score behind them is a copy of a pre-selection one.
_SELECTS = {"Gather", "GatherND", "GatherElements", "TopK", "Concat", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
            "Slice", "Identity", "Transpose", "Split", "Expand", "If"}


def selection_of(mg, strict: bool = False) -> detect.Selection | None:
    """A detector exported with its post-processing: float boxes (D, 4), float scores (D,) and integer labels (D,)
    outputs (torchvision's detection models), the scores copied by selection ops (Gather, GatherND, TopK, Concat,
    ...) from the output of a Softmax/Sigmoid over (N, A, C) class scores. None for any other model. strict: an
    InputError when the outputs are such detections but their scores come from no (N, A, C) tensor (explaining the
    boxes or the post-NMS scores instead would be a wrong answer)."""
    outs = {"boxes": [], "scores": [], "labels": []}
    for o in mg.graph.outputs:
        shape, floating = mg.shape(o), o.dtype is not None and np.issubdtype(o.dtype, np.floating)
        rank = None if shape is None else len(shape)
        if rank == 2 and floating and shape[1] == 4:
            outs["boxes"].append(o)
        elif rank == 1:
            outs["scores" if floating else "labels"].append(o)
    if not all(len(v) == 1 for v in outs.values()):
        return None
    found = _pre_selection(mg, outs["scores"][0])
    shape = None if found is None else mg.shape(found[1])
    logits = found is not None and (shape is None or len(shape) != 3) \
        and (levels := _level_logits(mg, outs["scores"][0])) is not None
    if logits:  # RetinaNet: a Sigmoid per level after the selection cut the logits; explain the logits
        found, shape = levels, mg.shape(levels[1])
    regions = found is not None and shape is not None and len(shape) == 2 and mg.per_region(found[1])
    if regions:  # Faster R-CNN: the (R, C) scores of one image's regions, explained as (1, R, C) (rewrite.py)
        shape = (1, *shape)
    if shape is None or len(shape) != 3 or not all(isinstance(d, int) for d in shape[1:]):
        what = "no Softmax/Sigmoid" if found is None else f"{found[1].name!r} of shape {_fmt(shape)}"
        if strict:
            names = ", ".join(repr(v[0].name) for v in outs.values())
            raise InputError(f"outputs {names} are detections after NMS, but the class scores they are selected "
                             f"from ({what}) are not (N, anchors, classes) or per-region (regions, classes) scores "
                             "onnxcam reads: give score= a tensor to explain", option="score")
        log.info("detector outputs found, but their class scores come from %s, not (N, A, C)", what)
        return None
    node, probs = found
    return detect.Selection(probs.name, outs["boxes"][0].name, outs["scores"][0].name, outs["labels"][0].name,
                            shape[1], shape[2], node.op, logits, regions)


def _pre_selection(mg, scores: gs.Tensor) -> tuple[gs.Node, gs.Tensor] | None:
    """The Softmax/Sigmoid whose output the post-NMS scores are picked from (the nearest)."""
    return next(_activations_behind(mg, scores), None)


def _activations_behind(mg, scores: gs.Tensor):
    """Each Softmax/Sigmoid (node, output) whose output the post-NMS scores are picked from, nearest first,
    walking back along float inputs through selection ops only (anything else would make the scores no copy)."""
    def follow(node):  # data inputs of selection ops, and nothing past an activation
        if node.op in ("Softmax", "Sigmoid") or node.op not in _SELECTS:
            return ()
        data = node.inputs[:1] if node.op in ("Gather", "GatherND", "GatherElements", "TopK", "Slice", "Reshape",
                                               "Expand") else node.inputs
        return [i for i in data if i.dtype is not None and np.issubdtype(i.dtype, np.floating)]

    for node in mg.walk_back([scores], follow):
        if node.op in ("Softmax", "Sigmoid"):
            yield node, node.outputs[0]


# Ops that cut one image's level out of a head's (N, A, C) output: the image (Gather), the level's anchors
_CUTS = {"Gather", "Slice", "Split", "Squeeze", "Identity"}


def _level_logits(mg, scores: gs.Tensor) -> tuple[gs.Node, gs.Tensor] | None:
    """RetinaNet's post-processing (torchvision): the head's (N, A, C) logits are split into levels along the
    anchors, one image is picked, and each level's slice gets its own Sigmoid before TopK and NMS. When every
    Sigmoid behind the scores reads a cut of the same static (N, A, C) tensor (their class axis its last), that
    tensor (with one of the Sigmoids); else None."""
    sigmoids = [node for node, _ in _activations_behind(mg, scores)]
    if not sigmoids or any(node.op != "Sigmoid" for node in sigmoids):
        return None
    sources = set()
    for node in sigmoids:
        t = node.inputs[0]
        cut = mg.shape(t)
        while (producer := mg.producer(t)) is not None and producer.op in _CUTS:
            t = producer.inputs[0]
        shape = mg.shape(t)
        if shape is None or len(shape) != 3 or not all(isinstance(d, int) for d in shape[1:]) \
                or cut is None or cut[-1] != shape[2]:
            return None
        sources.add(t.name)
    return (sigmoids[0], mg.tensor(sources.pop())) if len(sources) == 1 else None


# ---- the layer -----------------------------------------------------------------------------------------------
def layer(mg, score: str, task: str = "auto") -> Choice:
    """The automatic layer for explaining `score` in `task` (auto: from the score's shape), and its rule."""
    if task not in TASK_CHOICES:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(TASK_CHOICES)}")
    if task == "auto":
        task = task_of(mg, score)
    end = mg.tensor(score)
    nodes, on_path, maps, scaled = _maps(mg, end)
    found = None
    if task == "detect":
        found = _detect_layer(mg, scaled)
    elif task == "segment":
        found = _segment_layer(mg, scaled, end)
    elif task == "ocr":
        found = ocr.ocr_layer(mg, nodes, on_path, end)
    if found:
        return found
    # maps whose size is the input's over a stride; else any (N, C, h, w) (a model whose size is unknown)
    return _classify_layer(mg, nodes, on_path, scaled or maps, score)


def _maps(mg, end: gs.Tensor) -> tuple[list, set, list, list]:
    """The nodes and tensors on the paths from the input to `end`, the maps among them (4-D, spatial, no
    attention products or region crops), and those of the maps whose size is the input's over a stride."""
    nodes, on_path = mg.path_nodes([mg.tensor(mg.input_name)], end)
    # RoiAlign's crops (R, C, h, w) and what is made of them are regions, not maps of the image
    regions = mg.forward_reach([o for n in nodes if n.op == "RoiAlign" for o in n.outputs])
    maps = [out for node in nodes for out in node.outputs if out.name in on_path and out is not end
            and _spatial(mg.shape(out)) and not _attention_product(mg, out, on_path) and out.name not in regions]
    hw = input_hw(mg)
    scaled = [t for t in maps if _scaled(mg, t, hw)] if hw else []
    return nodes, on_path, maps, scaled


def _spatial(shape) -> bool:
    if shape is None or len(shape) != 4:
        return False
    return sum(1 for d in shape[1:] if not (isinstance(d, int) and d <= 1)) >= 2


def _hw_of(mg, t: gs.Tensor) -> tuple:
    """A map's (h, w): NCHW unless its axes were made channels-last by a Transpose of an NCHW map."""
    shape = mg.shape(t)
    perm = _perm_from_origin(mg, t)
    if perm is not None:
        return shape[perm.index(2)], shape[perm.index(3)]
    return shape[2], shape[3]


def _scaled(mg, t: gs.Tensor, hw: tuple) -> bool:
    """A map whose size is the input's over a stride: NCHW, or channels-last where its layout is not known from
    an NCHW op (Keras exports, (N, H, W, C) blocks)."""
    if _scales(_hw_of(mg, t), hw):
        return True
    return _perm_from_origin(mg, t) is None and _scales(mg.shape(t)[1:3], hw)


def _perm_from_origin(mg, t: gs.Tensor) -> list | None:
    """How t's axes come from the NCHW op that made them (t axis i = origin axis perm[i]), walking back through
    elementwise ops and Transposes; None when the origin is no NCHW op (a LayerNorm over (N, H, W, C), ...)."""
    perm = [0, 1, 2, 3]
    while (node := mg.producer(t)) is not None:
        if node.op in _NCHW:
            return perm
        if node.op == "Transpose":
            p = node.attrs.get("perm")
            if p is None or len(p) != 4:
                return None
            perm = [int(p[k]) for k in perm]
        elif node.op not in _ELEMENTWISE:
            return None
        t = node.inputs[0]
        if mg.shape(t) is None or len(mg.shape(t)) != 4:
            return None
    return None


def _oriented(mg, t: gs.Tensor) -> bool:
    """False for a map whose height and width are swapped relative to the input (MTCNN's permute(0, 3, 2, 1))."""
    perm = _perm_from_origin(mg, t)
    return perm is None or perm.index(2) < perm.index(3)


def _classify_layer(mg, nodes, on_path, maps, score) -> Choice:
    oriented = [t for t in maps if _oriented(mg, t)]
    skipped = len(maps) - len(oriented)
    last = oriented[-1] if oriented else None
    vit = _vit_layer(mg, nodes, on_path, last)
    if vit is not None:
        return vit
    if last is None:
        raise LayerError("found no 4-D activation with a spatial size > 1 on the path to the score; name a layer")
    stage = _before_final_norm(mg, last, on_path, oriented)
    if stage is not None:
        return Choice(stage.name, "channels-last: the last stage's output before the final norm (Swin)")
    rule = "classify: the last spatial activation before the score"
    if skipped and maps[-1] is not last:
        rule += " (a later map with height and width swapped was skipped)"
    return Choice(last.name, rule)


def _detect_layer(mg, maps: list) -> Choice | None:
    """The last map from which every map the heads end in is reachable: the neck's output that feeds every
    scale (on a single-scale head: the last map before the head's own prediction maps)."""
    if not maps:
        return None
    names = {t.name for t in maps}
    reach = {t.name: mg.forward_reach([t]) & names for t in maps}
    terminals = {t.name for t in maps if reach[t.name] == {t.name}}
    for t in reversed(maps):
        if t.name not in terminals and terminals <= reach[t.name] and _oriented(mg, t):
            return Choice(t.name, f"detect: the last map feeding all {len(terminals)} head outputs (the neck)")
    return None


@dataclass(frozen=True)
class Scales:
    """A multi-scale detector's layers, one per scale (finest first), each to be differentiated apart from the
    others (Explainer(apart=True)), and the rule that found them."""

    names: tuple[str, ...]
    rule: str


def scale_layers(mg, score: str) -> Scales | None:
    """Per scale of a multi-scale detection head (its output maps grouped by size), the last map that every path
    from the input to that scale's head outputs crosses: the neck's output at that stride, or the scale's own stem.

    Differentiated apart (rewrite.build), a layer's gradient comes only along paths that cross no other of these
    maps. Since each dominates its own scale's outputs, another scale's outputs are reached from a layer only
    through that scale's layer: a detection, whose seed is on its own scale's outputs alone, gets exactly its
    gradient at its own scale's layer and zero at the others, and the neck between the scales (the cost of
    explaining a coarse detection at a fine map) is never differentiated. None for a single-scale head, or where
    two scales share their last map (then `layer`'s one neck map)."""
    _, _, _, maps = _maps(mg, mg.tensor(score))
    names = {t.name for t in maps}
    reach = {t.name: mg.forward_reach([t]) & names for t in maps}
    terminals = [t for t in maps if reach[t.name] == {t.name}]
    groups: dict[tuple, set] = {}
    for t in terminals:
        groups.setdefault(tuple(_hw_of(mg, t)), set()).add(t.name)
    if len(groups) < 2:
        return None
    source = mg.tensor(mg.input_name)

    def feeds_all(t: gs.Tensor, group: set) -> bool:  # every path from the input to the group crosses t
        return group <= reach[t.name] and not mg.forward_reach([source], stop={t.name}) & group

    chosen = []
    for hw, group in sorted(groups.items(), key=lambda kv: -int(np.prod(kv[0]))):  # finest scale first
        found = next((t for t in reversed(maps) if t.name not in group and feeds_all(t, group)
                      and _oriented(mg, t)), None)
        if found is None:
            return None
        chosen.append((found, group))
    if len({t.name for t, _ in chosen}) < len(chosen):
        return None  # one map feeds two scales' heads (no neck between them to leave out)
    return Scales(tuple(t.name for t, _ in chosen),
                  f"detect: each of the {len(chosen)} scales' last map before its head (the neck at that scale), "
                  "differentiated apart: a detection is explained at its own scale's map")


def _segment_layer(mg, maps: list, score_t: gs.Tensor) -> Choice | None:
    """The backbone's last map (the exporter's 'backbone' module scope); else the last map at the coarsest stride
    that is not a class map (K channels)."""
    from ..graph.names import node_module

    protos = {n.name: n for n in mg.proto.graph.node}
    for t in reversed(maps):
        node = mg.producer(t)
        proto = protos.get(node.name) if node is not None else None
        module = node_module(proto) if proto is not None else None
        if module and "backbone" in module.split(".") and _oriented(mg, t):
            return Choice(t.name, "segment: the last map of the backbone module (before the decoder)")
    if not maps:
        return None
    classes = mg.shape(score_t)[1]
    coarsest = min(int(np.prod(_hw_of(mg, t))) for t in maps)
    for t in reversed(maps):
        shape = mg.shape(t)
        if int(np.prod(_hw_of(mg, t))) == coarsest and shape[1] != classes and _oriented(mg, t):
            return Choice(t.name, "segment: the last map at the coarsest stride that is not a class map")
    return None


# ---- vision transformers -------------------------------------------------------------------------------------
def _attention_product(mg, t: gs.Tensor, on_path: set) -> bool:
    """t is a product of two activations (attention scores or attention @ values) only reshaped or permuted: a
    4-D (tokens, N, heads, dim) or (N, heads, tokens, dim) tensor of a transformer, no map (the dynamo exporter
    with a fixed batch gives such tensors dims that happen to scale like the input)."""
    while (node := mg.producer(t)) is not None and node.op in ("Transpose", "Reshape", "Identity", "Squeeze",
                                                                "Unsqueeze"):
        t = node.inputs[0]
    return node is not None and node.op in ("MatMul", "Einsum") and sum(i.name in on_path for i in node.inputs) >= 2


def _before_final_norm(mg, last: gs.Tensor, on_path: set, maps: list) -> gs.Tensor | None:
    """Swin's tail: the last map is its (N, H, W, C) last stage normalised per position (LayerNorm, then a
    Transpose to NCHW before pooling). The stage's output, the norm's input, is the layer practitioners take
    (pytorch-grad-cam's swinT reshape_transform); None for any other tail."""
    t = last
    while (node := mg.producer(t)) is not None and node.op in ("Transpose", "Identity"):
        t = node.inputs[0]
    if node is None or node.op != "LayerNormalization":
        return None
    stage = node.inputs[0]
    return stage if stage.name in on_path and any(m is stage for m in maps) else None


def _vit_layer(mg, nodes, on_path, last_map) -> Choice | None:
    """Token mixing after the last spatial map (attention MatMuls between two activations): the input of the
    norm that feeds the last such product, i.e. the residual stream entering the last block. Its gradient reaches
    every token; a later per-token tensor's reaches only the class token."""
    after = -1 if last_map is None or mg.producer(last_map) is None else mg.order(mg.producer(last_map))
    mixing = [n for n in nodes if n.op in ("MatMul", "Einsum") and mg.order(n) > after
              and sum(1 for i in n.inputs if i.name in on_path) >= 2]
    if not mixing:
        return None
    norm_input = _norm_input_before(mg, mixing[-1], on_path)
    if norm_input is None:
        return None
    return Choice(norm_input.name, "vit: the input of the last block's norm (the residual stream it attends over)")


def _norm_input_before(mg, node: gs.Node, on_path: set) -> gs.Tensor | None:
    """The data input of the nearest LayerNormalization (or exported-as-ops mean/subtract norm) behind `node`."""
    def follow(producer):
        return [i for i in producer.inputs if i.name in on_path]

    for producer in mg.walk_back(follow(node), follow):
        if producer.op == "LayerNormalization" or (producer.op == "Sub" and _is_mean_subtraction(mg, producer)):
            return producer.inputs[0]
    return None


def _is_mean_subtraction(mg, node: gs.Node) -> bool:
    """x - ReduceMean(x): the first op of a LayerNorm exported as elementary ops."""
    x, mean = node.inputs[0], node.inputs[1]
    producer = mg.producer(mean)
    return producer is not None and producer.op == "ReduceMean" and producer.inputs[0] is x


def _fmt(shape) -> str:
    if shape is None:
        return "(unknown)"
    return "(" + ", ".join("N" if d is None or isinstance(d, str) else str(d) for d in shape) + ")"
