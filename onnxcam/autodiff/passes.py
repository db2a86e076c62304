"""Optimizations kept out of the rules, each with its precondition checked.

A rule sees one forward node while the walk is under way and writes its formula only. The passes here see more:
- fold_silu looks at the forward graph before the walk and finds products x * Sigmoid(x) whose gradient the walk
  writes as one formula in place of the Mul and Sigmoid rules;
- pool_indices, also before the walk, picks the MaxPools whose gradient scatters to the argmax positions the
  forward node reports in its Indices output, in place of the MaxPool rule's recomputed argmax. It is the one
  place that may alter the forward graph: it asks a MaxPool for that output (same values, one more output);
- take_class_rows, fold_crops and split_conv_channels run once every gradient node exists, so they see every
  reader of a tensor and can change a node that other branches might read (Add, Sum, Identity and Expand hand one
  gradient tensor to several rules);
- crop_seed_windows and skip_zero_slabs, last, use where a detection's seed is zero: each scale's head branch and
  the neck and backbone after it run on the windows its anchors reach (windows.py), and only for the scales the
  seed touches (an If). Their nodes have no gradient rules: a graph that will be differentiated again
  (hessian.py) is built without them (SEED_PASSES);
- blocked_complements and blocked_hard_swish, after them, write seed-independent factors left in the main graph
  (a SiLU's 1 - s, a HardSwish's slope) with ops onnxruntime keeps in its blocked layout (NCHWc).
(passes_channels.py and passes_regions.py hold the passes that change how the walk starts from the seed.)
Builder.passes names the passes that run (all by default); tests switch one off to compare the graphs.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from .builder import Builder
from .rules.activations import blocked_hard_swish_slope
from .windows import Region, window_region

__all__ = ["SEED_PASSES", "blocked_complements", "blocked_hard_swish", "crop_seed_windows", "fold_crops", "fold_silu",
           "pool_indices", "pool_indices_gradient", "silu_gradient", "skip_zero_slabs", "split_conv_channels",
           "take_class_rows"]

log = logging.getLogger(__name__)

_TO_THE_END = 2**31 - 1  # a Slice end at least this large keeps the whole axis
# Passes whose nodes (If, crops with run-time bounds) have no gradient rule: off in a graph differentiated again.
SEED_PASSES = frozenset({"crop_seed_windows", "skip_zero_slabs", "seed_channels"})


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


def blocked_complements(b: Builder) -> int:
    """Write each 1 - s of a float32 NCHW map left in the main graph (after skip_zero_slabs: not in a branch) as
    a depthwise 1x1 Conv (weight -1, bias 1: the same rounding as the Sub); return how many.

    onnxruntime's blocked-layout (NCHWc) transform keeps Conv, Sigmoid, Add and Mul of blocked maps blocked, but
    not a Sub with a constant: with the Sub, every SiLU's gradient factor s + out (1 - s) reads s and the product
    back in NCHW (a reorder of each). Inside an If's branch the transform does not run, and a depthwise Conv in
    NCHW is slower than the Sub: those stay Subs."""
    if "blocked_complements" not in b.passes:
        return 0
    done = 0
    for n in list(b.graph.nodes):
        if n.op != "Sub" or n.name not in b.origins or not _is_one(n.inputs[0]):
            continue
        s = n.inputs[1]
        if b.made(s) or s.dtype != np.float32:  # a forward map (its shape known); the gradients' stay Subs
            continue
        shape = b.model.shape(s)
        if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
            continue
        channels = shape[1]
        n.op, n.attrs = "Conv", {"group": channels}
        n.inputs.clear()
        n.inputs.extend([s, gs.Constant(f"{n.name}_w", np.full((channels, 1, 1, 1), -1.0, np.float32)),
                         gs.Constant(f"{n.name}_b", np.ones(channels, np.float32))])
        done += 1
    return done


def blocked_hard_swish(b: Builder) -> int:
    """Write the slope of each HardSwish whose gradient product stays in the main graph (after skip_zero_slabs)
    with ops onnxruntime keeps in its blocked layout (activations.blocked_hard_swish_slope: clipped depthwise 1x1
    convolutions, exact at the kinks); return how many.

    The HardSwish rule's comparisons and Wheres run in NCHW only: every HardSwish's input was reordered out of the
    blocked layout for them and the slope reordered back (MobileNetV3 middle layers, tools/bench_tasks.py: LRASPP's
    backbone.12 2.33x -> 2.10x, DeepLabV3's backbone.6 2.69x -> 2.50x). Where the product is inside an If's branch
    (a detector's deeper levels) the transform does not run there, and the Wheres stay: the convolutions would
    cost more than they save."""
    if "blocked_hard_swish" not in b.passes:
        return 0
    read_here = {t.name for n in b.graph.nodes for t in n.inputs}
    done = 0
    for n in list(b.graph.nodes):
        x = _hard_swish_input(b, n)
        if x is None or n.outputs[0].name not in read_here:
            continue
        before = b.node, b.rule
        origin = b.origins[n.name]
        b.node, b.rule = gs.Node(origin[1], name=origin[0]), "passes.blocked_hard_swish"
        try:
            slope = blocked_hard_swish_slope(b, x, b.model.shape(x)[1]).inputs[0]
        finally:
            b.node, b.rule = before
        out = n.outputs[0]
        n.outputs.clear()
        n.inputs.clear()
        slope.outputs.clear()
        slope.outputs.append(out)  # the new slope writes the Where's tensor, which the gradient product reads
        done += 1
    return done


def _hard_swish_input(b: Builder, n: gs.Node) -> gs.Tensor | None:
    """x when `n` is the outer Where of the HardSwish rule's slope on a float32 4-D forward map of static
    channels (opset 11 on: Clip's bounds as inputs), else None."""
    if n.op != "Where" or b.origins.get(n.name, (None, None, None))[2] != "activations._hard_swish":
        return None
    less = n.inputs[0].inputs[0] if len(n.inputs[0].inputs) == 1 else None
    if less is None or less.op != "Less" or b.dtype != np.float32 or b.opset < 11:
        return None
    x = less.inputs[0]
    shape = b.model.shape(x)
    if b.made(x) or x.dtype != np.float32 or shape is None or len(shape) != 4 or not isinstance(shape[1], int):
        return None
    return x


def _is_one(t) -> bool:
    return isinstance(t, gs.Constant) and t.values.size == 1 and float(t.values.reshape(-1)[0]) == 1.0


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
    Large 2-D windows (_separable: SPP's 5x5 to 13x13, stride 1) leave the forward node as it is and take their
    positions from two MaxPools of the gradient graph instead, one along the rows, one down the columns.
    """
    if "pool_indices" not in b.passes:
        return set()
    chosen = {id(n) for n in nodes if n.op == "MaxPool" and (n.domain or "") in ("", "ai.onnx")
              and int(n.attrs.get("storage_order", 0)) == 0}
    if chosen:
        apart = sum(_separable(n) for n in nodes if id(n) in chosen) if b.opset >= 16 else 0
        log.debug("%d MaxPool gradients read the forward Indices output, %d two 1-D MaxPools' Indices",
                  len(chosen) - apart, apart)
    return chosen


def pool_indices_gradient(b: Builder, n: gs.Node, gy: list) -> list:
    """The maker for MaxPool node `n` chosen by pool_indices: gy scatter-added to the Indices positions (opset
    16+), or sent back through the taps that hold them (conv_pool.taps_gradient)."""
    from .rules.conv_pool import pool_windows, taps_gradient

    x = n.inputs[0]

    def scatter():
        return _scatter_add(b, x, _indices_output(n), gy[0])

    def separable():
        """The window's first maximum in row-major order is the first maximum, down the window's rows, of each
        row's first maximum: the positions of a MaxPool along the rows (1 x kw), then of one down the columns
        (kh x 1) over its output, kw + kh comparisons per output instead of kh * kw, while the forward MaxPool
        stays as onnxruntime runs it fastest (blocked, without Indices: SPP's 13x13 pool with Indices ran ~15x
        slower than without, with layout reorders around it)."""
        (kh, kw), (sh, sw), (top, left, bottom, right) = _window_geometry(n)
        rows, along = b.op("MaxPool", x, outputs=2, kernel_shape=[1, kw], strides=[1, sw], pads=[0, left, 0, right])
        _, down = b.op("MaxPool", rows, outputs=2, kernel_shape=[kh, 1], strides=[sh, 1], pads=[top, 0, bottom, 0])
        return _scatter_add(b, x, along, _scatter_add(b, rows, down, gy[0]))

    def taps():
        w = pool_windows(b, n)
        idx = _indices_output(n)
        where = b.op("Sub", idx, b.op("Mul", b.op("Div", idx, b.ints(w.plane)), b.ints(w.plane)))  # idx mod plane
        hit = b.mask(b.op("Equal", b.unsqueeze(where, [2]), b.const(w.taps)))  # [N, C, K, *out]
        return taps_gradient(b, n, w, hit, gy[0])
    if b.opset >= 16 and _separable(n):
        return [separable]
    return [scatter if b.opset >= 16 else taps]


# 2-D MaxPools with at least this many taps per window get their positions from two 1-D MaxPools (_separable).
_SEPARABLE_TAPS = 16


def _window_geometry(n: gs.Node) -> tuple | None:
    """((kh, kw), (sh, sw), (top, left, bottom, right)) of a 2-D MaxPool with explicit pads, no dilation and floor
    rounding, whose windows are rectangles of the input that the two 1-D pools cut the same way; else None."""
    kernel = [int(k) for k in n.attrs.get("kernel_shape", [])]
    if len(kernel) != 2 or int(n.attrs.get("ceil_mode", 0)) or n.attrs.get("auto_pad", "NOTSET") != "NOTSET":
        return None
    if any(int(d) != 1 for d in n.attrs.get("dilations", [1, 1])):
        return None
    strides = [int(v) for v in n.attrs.get("strides", [1, 1])]
    pads = [int(v) for v in n.attrs.get("pads", [0, 0, 0, 0])]
    return tuple(kernel), tuple(strides), tuple(pads)


def _separable(n: gs.Node) -> bool:
    """Whether MaxPool node n's gradient takes its positions from two 1-D MaxPools: a float 2-D pool with large
    windows (_SEPARABLE_TAPS) that _window_geometry describes, whose Indices the model does not compute itself."""
    geometry = _window_geometry(n)
    dtype = n.inputs[0].dtype
    return (geometry is not None and geometry[0][0] * geometry[0][1] >= _SEPARABLE_TAPS
            and dtype is not None and np.issubdtype(np.dtype(dtype), np.floating)
            and (len(n.outputs) < 2 or not n.outputs[1].name))


def _scatter_add(b: Builder, like: gs.Tensor, indices: gs.Tensor, g: gs.Tensor) -> gs.Tensor:
    """g added at the flat positions `indices` (a MaxPool's Indices output) of a zero tensor shaped like `like`."""
    flat = b.ints([-1])
    zeros = b.op("Reshape", b.zeros_like(like), flat)
    out = b.op("ScatterElements", zeros, b.op("Reshape", indices, flat), b.op("Reshape", g, flat), axis=0,
               reduction="add")
    return b.reshape_like(out, like)


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


# Gradient ops that keep each value where it is (or only move it): a tensor made from the seed by these alone is
# zero wherever the seed is, so a slab of it can be all zero (a detection's seed lies in one scale of the head).
_LOCAL_OPS = {"Mul", "Div", "Add", "Sub", "Neg", "Sum", "Where", "Cast", "Equal", "Identity", "Reshape", "Transpose",
              "Squeeze", "Unsqueeze", "Slice", "Gather", "Expand", "Concat", "Shape", "ConstantOfShape"}
# Of those, the ones that keep every axis's numbering (a sum along an axis stays a sum along that axis after them).
_AXIS_KEEPING_OPS = {"Mul", "Div", "Add", "Sub", "Neg", "Sum", "Where", "Cast", "Equal", "Identity", "Slice"}
# Reductions whose keepdims output keeps the other axes' positions apart (a Softmax rule's sum over the classes).
_REDUCE_OPS = {"ReduceSum", "ReduceMean", "ReduceMax"}
# Ops worth skipping: a group without any is cheaper to run than to test.
_COSTLY_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}


def skip_zero_slabs(b: Builder) -> int:
    """Run the gradient of each seed slab only when the slab holds a nonzero; return how many groups became Ifs.

    The seed of one detection is zero but at one anchor, which lies in one scale of a multi-scale head: the
    head's Concat of the scales cuts the seed into slabs of which all but one are zero, and the convolutions
    downstream of those (that scale's head branch, the neck's path from it) multiply zeros. The gradient is
    linear in the seed (every gradient node maps zero gradient inputs to zero), so nodes that read nothing but
    zero slabs (and forward tensors) output zeros: each group of gradient nodes reached from the same set of
    slabs, with a convolution or product in it, becomes an If that runs it when one of its slabs holds a nonzero
    (ReduceL1 != 0, so a NaN or inf runs it), else gives zeros shaped like the forward tensors whose gradients
    leave the group. YOLOv8n at 320 px, class scores seeded at one stride-8 anchor, CPU time of one thread:
    the neck (model.15) 1.38x -> 1.21x a plain inference, model.4 1.79x -> 1.66x (tools/bench_tasks.py; with
    crop_seed_windows, kernel time: 1.35x -> 1.10x and 1.77x -> 1.52x). Groups are keyed by nested slab names
    (_slab_groups): a scale's box and class branches are skipped apart, so a class seed on the output does not
    run the box branch of its scale (one thread's CPU time, 320 px: a YOLOX-tiny-style net 1.37x -> 1.23x at the
    neck, 1.87x -> 1.73x at dark3; YOLOv8n with output0 seeded at a stride-8 anchor 1.19x -> 1.08x and 1.59x ->
    1.47x at model.4).
    Preconditions: a slab is a Concat rule's Slice of a tensor made from the seed by position-keeping ops alone
    (_LOCAL_OPS: a dense gradient in the middle of the network is never zero); a group that reads every slab of
    one Concat never skips and stays as it is; every tensor that leaves a group is a gradient of a known forward
    tensor (b.gradient_of), whose shape the zeros take. Onnxruntime does not lay out convolutions inside a branch
    in NCHWc blocks, so a branch that runs costs more than before (crop_seed_windows makes most of it small).
    """
    if "skip_zero_slabs" not in b.passes or not _cuts_by_concat(b):
        return 0
    slabs, groups = _slab_groups(b, nested=True)
    done = 0
    for names, group in groups.items():
        if any(n.op in _COSTLY_OPS for n in group) and _as_if(b, group, [slabs[name] for name in sorted(names)
                                                                          if name in slabs]):
            done += 1
    if done:
        log.debug("%d gradient groups run only when their seed slabs are nonzero", done)
    return done


def _slab_groups(b: Builder, nested: bool) -> tuple[dict[str, gs.Tensor], dict[frozenset, list[gs.Node]]]:
    """({slab name: slab}, {frozenset of names: the gradient nodes reached from those slabs alone, in graph order})
    for the seed's slabs (_seed_slabs). A node's names are the nearest slabs on its way back to the seed, or
    (nested) those with every complete set of one inner Concat's slabs replaced by the slabs that Concat is cut
    from and a mark of the merge (_normalized): a scale's box and class branches (YOLOX's per-scale [box,
    objectness, classes], YOLOv8's boxes and classes) are groups of their own, and what their gradients meet in
    (the scale's stem) is the scale's group after the merge. Names only grow along the gradient's flow, so every
    group is convex (no path leaves it and comes back). A node reached from every slab of one outermost Concat is
    in no group (it always runs)."""
    nodes, slabs, reached = _slab_reach(b, nested)
    if len(slabs) < 2:
        return {}, {}
    siblings = _siblings(slabs)
    groups: dict[frozenset, list[gs.Node]] = {}
    for n in nodes:
        names = reached[id(n)]
        if names and not any(sib <= names for sib in siblings.values()):
            groups.setdefault(names, []).append(n)
    return {name: t for name, (_, t) in slabs.items()}, groups


def _slab_reach(b: Builder, nested: bool) -> tuple[list[gs.Node], dict, dict[int, frozenset]]:
    """(the gradient nodes in graph order, _seed_slabs, {id(node): the names of its gradient inputs' slabs, nearest
    or nested as in _slab_groups}). The nodes that find a region's boxes (_BOUNDS_RULE) read gradients made in
    other groups: they are reached from the names of their region's group (_window_homes; every slab for a region
    outside the groups), so that they and what reads them stay where the region's nodes are."""
    b.graph.toposort()
    homes = _window_homes(b)
    nodes = [n for n in b.graph.nodes if n.name in b.origins and n.outputs]  # not the ones other passes emptied
    slabs = _seed_slabs(b, nodes)
    reached: dict[int, frozenset] = {}
    producer = {id(t): n for n in nodes for t in n.outputs}
    siblings = _siblings(slabs)
    parent: dict[str, frozenset] = {}  # Concat -> the names of the gradient it is cut from (none: the outermost)
    for n in nodes:
        if n.name in homes:
            reached[id(n)] = homes[n.name]
            continue
        names = set()
        for t in n.inputs:
            if id(t) not in producer:
                continue  # a forward tensor or constant
            names |= {t.name} if t.name in slabs else reached[id(producer[id(t)])]
        if nested:
            names = _normalized(names, siblings, parent)
        reached[id(n)] = frozenset(names)
        if n.outputs[0].name in slabs and names:  # a slab of an inner Concat: cut from these
            parent[slabs[n.outputs[0].name][0]] = frozenset(names)
    return nodes, slabs, reached


def _siblings(slabs: dict) -> dict[str, frozenset]:
    """{Concat name: the names of its slabs} of _seed_slabs' {slab name: (Concat name, slab)}."""
    siblings: dict[str, frozenset] = {}
    for name, (concat, _) in slabs.items():
        siblings[concat] = siblings.get(concat, frozenset()) | {name}
    return siblings


def _normalized(names: set, siblings: dict, parent: dict) -> set:
    """names with every complete set of one inner Concat's slabs replaced by the slabs it is cut from and a mark
    of the merge (not a slab: it keeps the nodes after the merge apart from those before the cut)."""
    changed = True
    while changed:
        changed = False
        for concat, sib in siblings.items():
            if concat in parent and sib <= names:
                names = (names - sib) | parent[concat] | {_MERGED + concat}
                changed = True
    return names


_MERGED = "merged:"  # the mark of a merged inner Concat in a group's names (_normalized)


def _window_homes(b: Builder) -> dict[str, frozenset]:
    """{name of a node that finds a box of a skip_zero_slabs group's region: that group's names (_slab_groups,
    nested)}, kept on the builder between crop_seed_windows and skip_zero_slabs."""
    return b.window_homes


# The rule recorded for the nodes that find the boxes of a region beyond the heads (windows.window_region): they
# read gradients made in other skip_zero_slabs groups, so _slab_reach puts them in their region's group.
_BOUNDS_RULE = "passes.crop_seed_windows.bounds"
# Windows that cover more than this share of their map on average (for one anchor), or that come from gradients
# other than the seed's maps, cost more in crops, pads and small nodes than they save (YOLOv8n at 320 px, class
# scores seeded, a stride-32 anchor: 5.8 ms of gradient kernels without the neck's windows, 7.0 ms with them).
# None: window every node the table of op kinds allows (tests).
_WORTH: float | None = 0.35


def crop_seed_windows(b: Builder) -> int:
    """Run the gradient nodes that a sparse seed reaches on the windows of their maps that hold nonzeros; return
    how many nodes run on windows.

    A detection's seed is nonzero at one anchor: through a head branch of k same-padded 3x3 convolutions its
    gradient is nonzero on a (2k+1) x (2k+1) window of the scale's map, and from a stride-32 anchor on through the
    neck (strided convolutions' gradients widen the window by their stride, nearest Upsamples' gradients shrink
    it, Concats and C2f blocks keep it), while the dense adjoints compute every map whole. The windows propagate
    through a table of op kinds (windows.py: elementwise ops and channel Slices/Pads/Concats, stride-1 'same'
    Convs, strided Convs with span < stride, ConvTransposes); at run time each region's entering gradients give
    the rows and columns that hold a nonzero, every tensor runs on the box its table gives, and the tensors that
    leave are padded back with zeros. Exact: nothing outside a box is nonzero, so convolutions' zero padding at a
    box's border reads the values that are there (a zero seed slab gives 1x1 boxes of zeros, a dense seed boxes
    of the whole map). Regions: each scale's head branch, the rest of each skip_zero_slabs group, and the nodes
    that always run; their boxes are found where their nodes run (inside the group's If, or outside every If).
    Cost guard (_WORTH): a region keeps the nodes fed by the seed's maps whose windows, for one anchor, cover at
    most 35% of their map on average; beyond, crops, pads and the boxes' small nodes cost more than they save.
    YOLOv8n at 320 px, one anchor at the grid's centre, gradient kernel ms against HEAD (tools/bench_tasks.py
    --profile, medians of 3, loaded machine), stride 8 / 16 / 32: the output seeded, model.15 8.9 / 11.7 / 12.5 ->
    6.6 / 7.4 / 6.2, model.4 18.9 / 21.8 / 22.1 -> 16.4 / 16.6 / 15.9; class scores seeded (as the CLI does: the
    scales are Ifs already) model.15 1.7 / 3.6 / 6.4 -> 1.7 / 4.1 / 6.8, model.4 11.0 / 13.3 / 15.7 -> 10.9 /
    12.8 / 15.4 (at 320 px a stride-32 window covers its whole neck map after two 3x3 convolutions).
    Preconditions (a node that fails one keeps its dense map: its gradient inputs are padded back to it and its
    output measured again): every map it reads or writes is a static 4-D (N, C, H, W); a Conv or ConvTranspose
    has no bias, explicit pads and 2-D kernels, and a Conv keeps its map (stride 1, pads summing to (k-1)d) or has
    a kernel span below its stride; Add, Sub, Sum, Concat (of batch or channels) read gradients only, Mul and Div
    one gradient (Div's numerator) and forward tensors that are maps of the same (H, W) (then cropped) or
    broadcast over them; Slices and Pads touch batch or channels only, with constant bounds; opset 12 or later
    (Min and Max of int64 boxes)."""
    if "crop_seed_windows" not in b.passes or b.opset < 12 or not _cuts_by_concat(b):
        return 0
    nodes, slabs, reached = _slab_reach(b, nested=False)
    if len(slabs) < 2:
        return 0
    _, nearest = _slab_groups(b, nested=False)
    _, outer = _slab_groups(b, nested=True)  # skip_zero_slabs' groups
    heads = [g for names, g in nearest.items() if len(names) == 1]
    in_heads = {id(n) for g in heads for n in g}
    grouped = in_heads | {id(n) for g in outer.values() for n in g}
    rest = [n for n in nodes if reached[id(n)] and id(n) not in grouped]
    shapes = _inferred_shapes(b)
    gradients = {id(t) for n in nodes if reached[id(n)] for t in n.outputs} | {id(t) for _, t in slabs.values()}
    # Regions: each head branch (its own boxes: a neck's wider windows at the same map size would widen them), the
    # rest of each skip_zero_slabs group and the nodes that always run; their boxes are found where the region's
    # nodes are: in the group's If, or outside every If (reached from every slab). Each stops where its windows
    # grow large (_WORTH).
    regions = []
    for names, group in outer.items():
        member = {id(n) for n in group}
        regions += [(names, g) for g in heads if all(id(n) in member for n in g)]
        regions.append((names, [n for n in group if id(n) not in in_heads]))
    placed = {id(n) for _, g in regions for n in g}
    regions += [(frozenset(slabs), g) for g in heads if not any(id(n) in placed for n in g)]
    regions.append((frozenset(slabs), rest))
    points = _seed_maps(nodes, slabs)
    homes = _window_homes(b)
    done = 0
    for names, group in regions:
        region = Region(group, gradients, shapes, points=points)
        done += window_region(b, region, bounds_rule=_BOUNDS_RULE, worth=_WORTH)
        homes.update({k: names for k, o in b.origins.items() if o[2] == _BOUNDS_RULE and k not in homes})
    if done:
        log.debug("crop_seed_windows: %d gradient nodes run on windows", done)
    return done


def _seed_maps(nodes: list[gs.Node], slabs: dict) -> set[int]:
    """Ids of the seed's slabs and of what Transposes and Reshapes make of them (one anchor's nonzeros stay at one
    place: YOLOv8's (N, 4+C, HW) slab reshaped to (N, 4+C, H, W), YOLOX's (N, HW, 85) transposed first)."""
    maps = {id(t) for _, t in slabs.values()}
    for n in nodes:
        if n.op in ("Transpose", "Reshape") and id(n.inputs[0]) in maps:
            maps.add(id(n.outputs[0]))
    return maps


def _inferred_shapes(b: Builder) -> dict[str, tuple]:
    """Static shapes of the graph's tensors, the gradient ones included (onnx shape inference)."""
    import onnx

    model = gs.export_onnx(b.graph, do_type_check=False)
    kept = [n for n in model.graph.node if n.output]  # not the nodes other passes emptied
    del model.graph.node[:]
    model.graph.node.extend(kept)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:  # no shapes, no crops: the gradients stay as they are
        log.debug("no window crops: shape inference failed (%s)", exc)
        return {}
    shapes = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in vi.type.tensor_type.shape.dim)
    for t in b.graph.tensors().values():
        if isinstance(t, gs.Constant):
            shapes[t.name] = tuple(t.shape)
    return shapes


def _cuts_by_concat(b: Builder) -> bool:
    """Whether a Concat rule cut a gradient into slices (every seed slab is one): without any (a classifier's
    graph), the slab passes skip their walk of the whole graph (25 ms of a resnet50's build)."""
    return any(origin[1] == "Concat" and origin[2] == "shape._concat" for origin in b.origins.values())


def _seed_slabs(b: Builder, nodes: list[gs.Node]) -> dict[str, tuple[str, gs.Tensor]]:
    """{slab name: (its Concat's name, the slab)} for the Concat rule's Slices of tensors made from the seed by
    position-keeping ops alone, or by reductions along other axes than the slab's (a Softmax over the classes of
    an (N, anchors, classes) score: SSD, RetinaNet - each anchor's gradient stays its own)."""
    mixed: dict[int, frozenset | None] = {}  # id(emitted tensor) -> the axes it was summed along; None: not local
    for n in nodes:
        axes = [mixed.get(id(t)) if b.made(t) else frozenset() for t in n.inputs]
        out = None
        if all(a is not None for a in axes):
            summed = frozenset().union(*axes)
            if n.op in _LOCAL_OPS:
                out = summed if not summed or n.op in _AXIS_KEEPING_OPS else None  # renumbered axes: unknown
            elif n.op in _REDUCE_OPS:
                reduced = _reduced_axes(b, n)
                out = None if reduced is None else summed | reduced
        for t in n.outputs:
            mixed[id(t)] = out
    found = {}
    for n in nodes:
        origin = b.origins[n.name]
        if origin[1] == "Concat" and origin[2] == "shape._concat" and n.op == "Slice":
            summed, axis = mixed.get(id(n.inputs[0])), _slice_axis(b, n)
            if summed is not None and axis is not None and axis not in summed:
                found[n.outputs[0].name] = (origin[0], n.outputs[0])
    return found


def _reduced_axes(b: Builder, n: gs.Node) -> frozenset | None:
    """The axes (non-negative) a keepdims reduction sums along; None when not known or not keepdims."""
    if not int(n.attrs.get("keepdims", 1)):
        return None
    if "axes" in n.attrs:
        axes = n.attrs["axes"]
    elif len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant):
        axes = np.asarray(n.inputs[1].values).reshape(-1).tolist()
    else:
        return None
    if not axes:
        return None
    if min(axes) >= 0:
        return frozenset(int(a) for a in axes)
    rank = _rank(b, n.inputs[0])
    return None if rank is None else frozenset(int(a) % rank for a in axes)


def _rank(b: Builder, t: gs.Tensor) -> int | None:
    shape = b.model.shape(t) if not b.made(t) else t.shape
    return None if shape is None else len(shape)


def _slice_axis(b: Builder, n: gs.Node) -> int | None:
    """The one axis a gradient Slice cuts (the Concat rule's: constant axes of one entry), else None."""
    if len(n.inputs) >= 4 and isinstance(n.inputs[3], gs.Constant):
        axes = np.asarray(n.inputs[3].values).reshape(-1)
    else:
        axes = np.asarray(n.attrs.get("axes", []), np.int64).reshape(-1)
    if axes.size != 1:
        return None
    if axes[0] >= 0:
        return int(axes[0])
    rank = _rank(b, n.inputs[0])
    return None if rank is None else int(axes[0]) % rank


def _as_if(b: Builder, group: list[gs.Node], slabs: list[gs.Tensor]) -> bool:
    """Move `group` into the then-branch of an If on "some slab is nonzero"; the else-branch gives zeros for the
    tensors that leave the group. False (nothing changed) when one of those is no gradient of a known tensor."""
    inside = {id(n) for n in group}
    leaving = []
    for n in group:
        for t in n.outputs:
            readers = [r for r in t.outputs if id(r) not in inside]
            if readers or any(o is t for o in b.graph.outputs):
                if id(t) not in b.gradient_of:
                    return False
                leaving.append(t)
    if not leaving:
        return False
    origin = b.origins[group[0].name]
    before = b.node, b.rule
    b.node, b.rule = gs.Node(origin[1], name=origin[0]), "passes.skip_zero_slabs"
    try:
        zero = [b.op("Equal", b.op("ReduceL1", s, keepdims=0), 0.0) for s in slabs]
        run = b.op("Not", zero[0] if len(zero) == 1 else _all(b, zero))
        _outer_weights(b, group)
        then_out, else_out, else_nodes = [], [], []
        for t in leaving:
            # the forward tensor's shape on the If's outputs: onnx shape inference leaves an If's outputs unknown
            # (its batch then matches no forward tensor's, and onnxruntime's NCHWc transform, which keeps a Mul of
            # two blocked maps blocked only when their shapes provably match, reorders both back to NCHW)
            t.dtype, t.shape = b.dtype, _known(b.shape(b.gradient_of[id(t)][1]))
            inner = gs.Variable(f"{t.name}__onnxcam_then", dtype=b.dtype, shape=t.shape)
            producer = t.inputs[0]
            for r in [r for r in t.outputs if id(r) in inside]:
                _replace(r.inputs, t, inner)
            _replace(producer.outputs, t, inner)
            then_out.append(inner)
            shape = gs.Variable(f"{t.name}__onnxcam_shape", dtype=np.int64)
            zeros = gs.Variable(f"{t.name}__onnxcam_else", dtype=b.dtype, shape=t.shape)
            else_nodes += [gs.Node("Shape", name=f"{t.name}__onnxcam_shape", inputs=[b.gradient_of[id(t)][1]],
                                   outputs=[shape]),
                           gs.Node("ConstantOfShape", name=f"{t.name}__onnxcam_zeros", inputs=[shape],
                                   outputs=[zeros], attrs={"value": gs.Constant("zero", np.zeros(1, b.dtype))})]
            else_out.append(zeros)
        then_branch = gs.Graph(nodes=list(group), outputs=then_out, opset=b.opset, name=f"{run.name}_then")
        else_branch = gs.Graph(nodes=else_nodes, outputs=else_out, opset=b.opset, name=f"{run.name}_else")
        node = gs.Node("If", name=f"{run.name}_if", inputs=[run], outputs=list(leaving),
                       attrs={"then_branch": then_branch, "else_branch": else_branch})
        b.graph.nodes[:] = [n for n in b.graph.nodes if id(n) not in inside]
        b._append(node)
    finally:
        b.node, b.rule = before
    return True


def _known(shape) -> list | None:
    """A shape for a graph's value_info: None when unknown, dims as ints or symbol names (unknown dims None)."""
    if shape is None:
        return None
    return [d if isinstance(d, (int, str)) else None for d in shape]


def _outer_weights(b: Builder, group: list[gs.Node]) -> None:
    """Read the group's non-scalar constants (the model's weights) through an Identity outside it: a branch would
    hold its own copy of every constant it reads, where the weights must stay the model's initializers (they may
    be placeholders filled at session start)."""
    outer: dict[int, gs.Tensor] = {}
    for n in group:
        for t in n.inputs:
            if isinstance(t, gs.Constant) and int(np.prod(t.shape)) > 1:
                if id(t) not in outer:
                    outer[id(t)] = b.op("Identity", t, widen=False)
                _replace(n.inputs, t, outer[id(t)])


def _replace(tensors, old: gs.Tensor, new: gs.Tensor) -> None:
    """Put `new` wherever `old` is in a node's inputs or outputs (item by item: graphsurgeon keeps both ends)."""
    for i, t in enumerate(list(tensors)):
        if t is old:
            tensors[i] = new


def _all(b: Builder, flags: list) -> gs.Tensor:
    out = flags[0]
    for f in flags[1:]:
        out = b.op("And", out, f)
    return out
