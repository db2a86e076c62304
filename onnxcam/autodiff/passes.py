"""Optimizations kept out of the rules, each with its precondition checked.

A rule sees one forward node while the walk is under way and writes its formula only. The passes here see more:
- fold_silu looks at the forward graph before the walk and finds products x * Sigmoid(x) whose gradient the walk
  writes as one formula in place of the Mul and Sigmoid rules;
- pool_indices, also before the walk, picks the MaxPools whose gradient scatters to the argmax positions the
  forward node reports in its Indices output, in place of the MaxPool rule's recomputed argmax. It is the one
  place that may alter the forward graph: it asks a MaxPool for that output (same values, one more output);
- take_class_rows, fold_crops and split_conv_channels run once every gradient node exists, so they see every
  reader of a tensor and can change a node that other branches might read (Add, Sum, Identity and Expand hand one
  gradient tensor to several rules).
Builder.passes names the passes that run (all by default); tests switch one off to compare the graphs.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from .builder import Builder

__all__ = ["fold_crops", "fold_silu", "pool_indices", "pool_indices_gradient", "silu_gradient", "split_conv_channels",
           "take_class_rows"]

log = logging.getLogger(__name__)

_TO_THE_END = 2**31 - 1  # a Slice end at least this large keeps the whole axis


def fold_silu(b: Builder, nodes: list[gs.Node]) -> dict[int, gs.Tensor]:
    """The SiLU products among `nodes` (the walk's): {id(Mul node): its Sigmoid's output s} for every
    Mul(x, s) or Mul(s, x) with s = Sigmoid(x).

    Every EfficientNet export spells SiLU out this way. The walk then writes d/dx = s + out (1 - s) for the Mul
    (silu_gradient: four passes over the tensor, where the product and Sigmoid rules apart take six and a Sum)
    and sends nothing through s. Precondition, since s then gets no gradient of its own: s feeds only that Mul,
    and is neither a target nor a graph output (b.private_to).
    """
    if "fold_silu" not in b.passes:
        return {}
    folds = {}
    for n in nodes:
        if n.op != "Mul" or len(n.inputs) != 2:
            continue
        for s, x in (n.inputs, reversed(n.inputs)):
            producer = s.inputs[0] if s.inputs else None
            if producer is not None and producer.op == "Sigmoid" and producer.inputs[0] is x and b.private_to(s, n):
                folds[id(n)] = s
                break
    if folds:
        log.debug("folding %d SiLU products (x * Sigmoid(x)) into one gradient formula each", len(folds))
    return folds


def silu_gradient(b: Builder, n: gs.Node, s: gs.Tensor, gy: list) -> list:
    """The makers for Mul node `n` = x * s, s = Sigmoid(x), found by fold_silu: x takes g (s + out (1 - s)),
    s none (the walk never asks: s is off the path)."""
    out = n.outputs[0]

    def x_grad():
        return b.op("Mul", gy[0], b.op("Add", s, b.op("Mul", out, b.op("Sub", 1.0, s))))
    return [None if t is s else x_grad for t in n.inputs]


def pool_indices(b: Builder, nodes: list[gs.Node]) -> set[int]:
    """The MaxPools among `nodes` (the walk's) whose gradient reads their Indices output: {id(node)}.

    The MaxPool rule recomputes each window's first maximum from the input (a Gather of every window tap and an
    ArgMax); the forward node can report the same positions in its Indices output (flat over N*C*H*W, the first
    maximum on ties, padding excluded), and from opset 16 on the gradient is then one ScatterElements
    (pool_indices_gradient); before, the positions become the rule's tap masks. Precondition: storage_order 0
    (row-major indices), and the node's Indices output either unused (it is then added: the node computes the
    same values, plus their positions) or already computed for the model, whose readers see the same values.
    On by default: onnxruntime's MaxPool runs a slower kernel when asked for Indices, but the rule's gather of
    every window tap costs more (resnet18's stem MaxPool, 64x112x112 3x3/2, forward and gradient at batch 8 on one
    thread: 216 ms with the pass, 557 ms without; 378 vs 638 ms before opset 16).
    """
    if "pool_indices" not in b.passes:
        return set()
    chosen = {id(n) for n in nodes if n.op == "MaxPool" and (n.domain or "") in ("", "ai.onnx")
              and int(n.attrs.get("storage_order", 0)) == 0}
    if chosen:
        log.debug("%d MaxPool gradients read the forward Indices output", len(chosen))
    return chosen


def pool_indices_gradient(b: Builder, n: gs.Node, gy: list) -> list:
    """The maker for MaxPool node `n` chosen by pool_indices: gy scatter-added to the Indices positions (opset
    16+), or sent back through the taps that hold them (conv_pool.taps_gradient)."""
    from .rules.conv_pool import pool_windows, taps_gradient

    x = n.inputs[0]

    def scatter():
        flat = b.ints([-1])
        zeros = b.op("Reshape", b.zeros_like(x), flat)
        g = b.op("ScatterElements", zeros, b.op("Reshape", _indices_output(n), flat), b.op("Reshape", gy[0], flat),
                 axis=0, reduction="add")
        return b.reshape_like(g, x)

    def taps():
        w = pool_windows(b, n)
        idx = _indices_output(n)
        where = b.op("Sub", idx, b.op("Mul", b.op("Div", idx, b.ints(w.plane)), b.ints(w.plane)))  # idx mod plane
        hit = b.mask(b.op("Equal", b.unsqueeze(where, [2]), b.const(w.taps)))  # [N, C, K, *out]
        return taps_gradient(b, n, w, hit, gy[0])
    return [scatter if b.opset >= 16 else taps]


def _indices_output(n: gs.Node) -> gs.Tensor:
    """MaxPool node n's Indices output, added to the forward node when the model does not compute it."""
    if len(n.outputs) < 2 or not n.outputs[1].name:
        idx = gs.Variable(f"{n.outputs[0].name}__onnxcam_argmax", dtype=np.int64)
        if len(n.outputs) < 2:
            n.outputs.append(idx)
        else:
            n.outputs[1] = idx
    return n.outputs[1]


def take_class_rows(b: Builder) -> int:
    """Replace each product of a one-hot seed with a weight by a Gather of the classes' rows; return how many.

    A classifier's head is a Gemm or MatMul, so the first gradient the walk writes is onehot(classes) @ W: a
    (N, K) x (K, K_in) product that reads all of W to pick N of its rows. The Gather reads those N rows only
    (docs/benchmarks.md: the top-5 row). Precondition: the product's left operand is a seed made by b.one_hot (so
    each row has a single 1 at the class index) and not transposed, a Gemm has no C but the zero of old opsets,
    and a MatMul's right operand is the 2-D Transpose(W) its rule wrote. The product's output tensor is kept, now
    written by the Gather, so every reader of it sees the same values.
    """
    if "take_class_rows" not in b.passes:
        return 0
    done = 0
    for node in list(b.graph.nodes):
        if node.name not in b.origins or not node.inputs or node.op not in ("Gemm", "MatMul"):
            continue
        classes = b.one_hot_classes(node.inputs[0])
        rows = None if classes is None else _class_rows_of(b, node, classes)
        if rows is None:
            continue
        out, last = node.outputs[0], rows.inputs[0]
        node.inputs.clear()
        node.outputs.clear()
        last.outputs.clear()
        last.outputs.append(out)  # the rows' last node writes the product's tensor, which its readers keep
        done += 1
    if done:
        log.debug("replaced %d one-hot seed products by Gathers of the classes' weight rows", done)
    return done


def _class_rows_of(b: Builder, node: gs.Node, classes: gs.Tensor) -> gs.Tensor | None:
    """onehot(classes) @ W' for a gradient Gemm or MatMul `node`, as a Gather; None when no precondition holds."""
    before = b.node, b.rule
    b.node, b.rule = gs.Node(b.origins[node.name][1], name=b.origins[node.name][0]), "passes.take_class_rows"
    try:
        if node.op == "Gemm":
            zero_c = len(node.inputs) < 3 or (isinstance(node.inputs[2], gs.Constant)
                                              and not np.any(node.inputs[2].values))
            if int(node.attrs.get("transA", 0)) or not zero_c:
                return None
            rows = _class_rows(b, node.inputs[1], classes, transposed=bool(node.attrs.get("transB", 0)))
            alpha = float(node.attrs.get("alpha", 1.0))
            return rows if alpha == 1.0 else b.op("Mul", rows, alpha)
        t = node.inputs[1]
        transpose = t.inputs[0] if len(t.inputs) == 1 and t.inputs[0].name in b.origins else None
        if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != [1, 0]:
            return None
        return _class_rows(b, transpose.inputs[0], classes, transposed=True)
    finally:
        b.node, b.rule = before


def _class_rows(b: Builder, w: gs.Tensor, classes: gs.Tensor, transposed: bool) -> gs.Tensor:
    """(N, K_in) rows of a (K, K_in) weight for (N,) classes; of a (K_in, K) weight when transposed. A weight
    that the rule widened (fp16 models) is read in its own type: only the taken rows are widened."""
    w = b.unwidened(w)
    if not transposed:
        return b.take(w, classes, axis=0)
    return b.op("Transpose", b.take(w, classes, axis=1), perm=[1, 0])  # only the N taken columns move


def fold_crops(b: Builder) -> int:
    """Fold crops into the stride-1 Conv adjoints that feed them; return how many were folded.

    Exporters put an explicit Pad before convolutions ("same" padding computed at run time, TF's explicit pads);
    the Pad rule crops the incoming gradient with a step-less Slice. When that gradient is a stride-1 Conv (the
    adjoint of the next convolution), the crop by (a, e) on a spatial axis is the same Conv with its pads reduced
    by (a, e): the Slice, a copy, goes. Precondition: the Conv's output has no reader but the Slice and is no
    graph output, since a gradient can be another branch's too.
    """
    if "fold_crops" not in b.passes:
        return 0
    readers = Counter(t.name for n in b.graph.nodes for t in n.inputs)
    outputs = {t.name for t in b.graph.outputs}
    folded = 0
    for node in list(b.graph.nodes):
        conv = _croppable_conv(b, node, readers, outputs)
        if conv is None:
            continue
        pads = _cropped_pads(node, conv)
        if pads is None:
            continue
        conv.attrs["pads"] = pads
        out = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        conv.outputs.clear()
        conv.outputs.append(out)  # the Conv now writes the cropped tensor itself
        folded += 1
    if folded:
        log.debug("folded %d gradient crops into their adjoint convolutions", folded)
    return folded


def _croppable_conv(b: Builder, node: gs.Node, readers: Counter, outputs: set) -> gs.Node | None:
    """The gradient Conv that `node` crops, when `node` is a step-less gradient Slice and the Conv's output is
    read by it alone; else None."""
    if node.op != "Slice" or len(node.inputs) != 4 or node.name not in b.origins:
        return None
    g = node.inputs[0]  # by name, not b.made: a target's gradient was renamed to be a graph output
    conv = g.inputs[0] if len(g.inputs) == 1 and g.inputs[0].name in b.origins else None
    if conv is None or conv.op != "Conv" or "pads" not in conv.attrs or readers[g.name] != 1 or g.name in outputs:
        return None
    if any(int(s) != 1 for s in conv.attrs.get("strides", [1])):
        return None
    return conv


def _cropped_pads(node: gs.Node, conv: gs.Node) -> list[int] | None:
    """The Conv's pads reduced by the Slice's crop, or None when the Slice is no crop of spatial axes or a pad
    would turn negative."""
    if not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
        return None
    starts, ends, axes = (np.asarray(t.values, dtype=np.int64).reshape(-1) for t in node.inputs[1:])
    pads = [int(p) for p in conv.attrs["pads"]]
    spatial = len(pads) // 2
    for start, end, axis in zip(starts, ends, axes):
        if axis < 2 or axis >= 2 + spatial or start < 0 or 0 <= end < _TO_THE_END:
            return None
        pads[axis - 2] -= int(start)
        pads[axis - 2 + spatial] -= 0 if end >= _TO_THE_END else int(-end)
    return pads if min(pads) >= 0 else None


def split_conv_channels(b: Builder) -> int:
    """Replace each gradient Conv whose output is only cut into channel slabs by one Conv per slab; return how many.

    A Concat's gradient is a slab of gy per input (shape._concat: Slices along the channels, which onnxruntime
    fuses into a Split, a copy), and that gy is mostly the adjoint of the convolution after the Concat (YOLO's
    C2f and SPPF, CSP blocks, DenseNet). Output channels of a convolution are independent, so slab [a, e) of
    Conv(g, w) is Conv(g, w[a:e]): the same multiply-adds, without the copy (YOLOv8n at 640 px, layer model.4:
    2.4 ms of Split per run, tools/bench_tasks.py). Precondition: the Conv has no group and no bias, its output
    is no graph output, and every reader of it is a gradient Slice of axis 1 alone with constant bounds and
    step 1 (the weight is then sliced with the same bounds on its axis 0, the output channels).
    """
    if "split_conv_channels" not in b.passes:
        return 0
    readers: dict[str, list[gs.Node]] = {}
    for n in b.graph.nodes:
        for t in n.inputs:
            readers.setdefault(t.name, []).append(n)
    outputs = {t.name for t in b.graph.outputs}
    done = 0
    for conv in list(b.graph.nodes):
        slabs = _channel_slabs(b, conv, readers, outputs)
        if not slabs:
            continue
        before = b.node, b.rule
        b.node, b.rule = gs.Node(b.origins[conv.name][1], name=b.origins[conv.name][0]), "passes.split_conv_channels"
        try:
            for sl in slabs:
                w = b.op("Slice", conv.inputs[1], sl.inputs[1], sl.inputs[2], b.ints([0]))
                part = b.op("Conv", conv.inputs[0], w, **conv.attrs).inputs[0]
                out = sl.outputs[0]
                sl.inputs.clear()
                sl.outputs.clear()
                part.outputs.clear()
                part.outputs.append(out)  # the slab's Conv writes the Slice's tensor, which its readers keep
        finally:
            b.node, b.rule = before
        conv.outputs.clear()
        conv.inputs.clear()
        done += 1
    if done:
        log.debug("split %d gradient convolutions into their channel slabs", done)
    return done


def _channel_slabs(b: Builder, conv: gs.Node, readers: dict, outputs: set) -> list[gs.Node] | None:
    """The gradient Slices that read `conv`'s output, when they are all it has and each cuts axis 1 alone with
    constant bounds and no step; else None."""
    if conv.op != "Conv" or conv.name not in b.origins or len(conv.inputs) != 2 or len(conv.outputs) != 1:
        return None
    if int(conv.attrs.get("group", 1)) != 1:
        return None
    g = conv.outputs[0]
    slabs = readers.get(g.name, [])
    if not slabs or g.name in outputs:
        return None
    for sl in slabs:
        if sl.op != "Slice" or sl.name not in b.origins or len(sl.inputs) not in (4, 5) or sl.inputs[0] is not g:
            return None
        if not all(isinstance(t, gs.Constant) for t in sl.inputs[1:]):
            return None
        axes = np.asarray(sl.inputs[3].values).reshape(-1)
        if len(sl.inputs) == 5 and np.any(np.asarray(sl.inputs[4].values) != 1):
            return None
        if axes.tolist() != [1] or np.asarray(sl.inputs[1].values).size != 1:
            return None
    return slabs
