"""region_rows and roi_rows: a two-stage detector's box head and RoiAlign differentiated on the regions a seed
weighs only (roi_rows: see its docstring below).

Faster R-CNN scores R regions as (R, C) (rewrite.py: per-region scores), and a seed weighs K of them, usually one
(a detection's). Between RoiAlign's output and that score, the box head acts on each region's row alone (Flatten,
the fc6/fc7 Gemms and their ReLUs, the class Gemm, the Softmax over classes), so the gradient of every other row is
zero and the rows seeded need nothing from them. Without this pass the walk still runs the head's gradient on all R
rows: on fasterrcnn_mobilenet_v3_large_320_fpn, fc6's gradient Gemm (R x 1024 by 1024 x 12544) alone was two
thirds of the gradient's time.

The pass finds that part of the walk's nodes (the segment: from the score down, every node row-wise on the region
axis), and the walk differentiates the segment's nodes on row views: copies of them, not in the graph, whose
region-aligned tensors are Gathers of the forward tensors' rows at the seeded regions. The seed enters as its K
rows, and the segment's entries (the tensors it reads from below, e.g. the pooled crops of all regions) as Gathers
that the walk differentiates too: their rule (shape._gather) adds the K rows' gradient into zeros of the entry's
(R, ...) shape, where the walk goes on as before (RoiAlign's gradient). The same formulas on the same values, on K
rows instead of R: the numbers are those of the graph without the pass (float32 summation order aside).

The regions: those of the seed's rows as rewrite._region_seeds lays them out on the run's R regions (sorted, each
once, the first of equal rows, none outside 0..R-1), found in the graph by NonZero, so that each run has its own.

Preconditions, checked (else the walk runs as before): the seed is a per-region seed (rewrite._region_seeds
recorded its rows in Builder.region_seeds); opset 16 or newer (the entries' gradient is ScatterND with
reduction='add'); the score's static first axis R (the shape probe's count) is at least 2, so that a row-aligned
tensor (first axis R) is told apart from one broadcast over the rows (first axis 1); and each node of the segment
is row-wise: one of the ops below, every output and every row-aligned input with first axis R, its other inputs
read alike by every row (weights, or operands broadcast over the rows), every reader on the path of its outputs in
the segment, and none of its outputs a target (their gradients are wanted whole).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .builder import Builder

__all__ = ["ROI_RULE", "RULE", "RowView", "region_rows", "roi_rows", "roi_rows_gradient"]

log = logging.getLogger(__name__)

RULE = "passes.region_rows"  # the rule recorded for the nodes this pass emits (rewrite._sign's doc_strings)
ROI_RULE = "passes.roi_rows"  # and for RoiAlign's gradient on the rows that carry one
ROWS_DIM = "onnxcam_seeded_regions"  # the symbolic first axis of the row views

# Row-wise ops: elementwise (operands row-aligned or broadcast over the rows), reshapes that keep each region's
# elements in its row, and ops that read the region axis as a batch axis (the convolutions of a box head such as
# torchvision's FastRCNNConvFCHead). Gemm, MatMul, Softmax, LogSoftmax and Transpose are checked one by one.
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Pow", "Relu", "LeakyRelu", "Elu", "Selu",
                "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Gelu", "Erf", "Identity",
                "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Clip", "PRelu"}
_RESHAPES = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}
# (Not MaxPool: passes.pool_indices, which runs after this pass, would ask a row view for an Indices output.)
_BATCHED = {"Conv"}


@dataclass
class RowView:
    """A node of the segment as its rule sees it, on the seeded rows: what a gs.Node shows a rule, but in no graph
    (a gs.Node would link itself to the tensors it names as their reader or producer)."""

    op: str
    name: str
    attrs: dict
    domain: str | None
    inputs: list
    outputs: list


@dataclass
class _Segment:
    nodes: list  # the segment's nodes, in the walk's (topological) order
    aligned: dict  # id(node) -> positions of its row-aligned inputs


def region_rows(b: Builder, nodes: list[gs.Node], on_path: set[str], score: gs.Tensor,
                seed: gs.Tensor) -> tuple[list[gs.Node], set[str], gs.Tensor, gs.Tensor]:
    """The walk's (nodes, tensors on the path, top tensor, its seed): the segment's nodes replaced by row views
    after the Gathers of its entries, the score by its seeded rows and the seed by those rows' weights, when the
    preconditions hold (module docstring); else the arguments unchanged."""
    unchanged = nodes, on_path, score, seed
    given = b.region_seeds.get(seed.name)
    if "region_rows" not in b.passes or given is None or b.opset < 16:
        return unchanged
    shape = b.model.shape(score)
    regions = shape[0] if shape else None
    if not isinstance(regions, int) or regions < 2:
        return unchanged
    segment = _segment(b, nodes, on_path, score, regions)
    if not segment.nodes:
        return unchanged
    before = b.node, b.rule
    b.node, b.rule = segment.nodes[-1], RULE
    try:
        seeded, weights = _seeded_rows(b, *given)
        walk, on_path, top = _row_walk(b, nodes, on_path, score, segment, seeded)
    finally:
        b.node, b.rule = before
    log.debug("the gradient of %d per-region nodes (%s) runs on the seeded regions' rows only", len(segment.nodes),
              ", ".join(sorted({n.op for n in segment.nodes})))
    return walk, on_path, top, weights


def _seeded_rows(b: Builder, row: gs.Tensor, found: gs.Tensor, rows: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor]:
    """(the seeded regions (K,), their rows of weights (K, C)) from rewrite._region_seeds' lookup: `row` (R,) the
    row of each region, `found` (R, 1) whether it has one, `rows` (K0, C) the rows given."""
    hit = b.op("Greater", b.squeeze(found, [1]), 0.0)  # boolean: onnxruntime's NonZero takes no doubles
    seeded = b.squeeze(b.op("NonZero", hit), [0])  # sorted, each region once
    seeded.dtype, seeded.shape = np.int64, [ROWS_DIM]
    return seeded, b.op("Gather", rows, b.op("Gather", row, seeded), axis=0)


def _segment(b: Builder, nodes: list[gs.Node], on_path: set[str], score: gs.Tensor, regions: int) -> _Segment:
    """The row-wise nodes from the score down (module docstring), found in reverse order: a node joins when every
    reader of its outputs on the path has."""
    readers: dict[str, list[gs.Node]] = {}
    for n in nodes:
        for t in n.inputs:
            if t.name in on_path:
                readers.setdefault(t.name, []).append(n)
    inside: set[int] = set()
    aligned: dict[int, list[int]] = {}
    for n in reversed(nodes):
        outs = [o for o in n.outputs if o.name in on_path]
        if not outs or any(o.name in b.targets for o in n.outputs):
            continue
        if not all(o is score or (readers.get(o.name) and all(id(r) in inside for r in readers[o.name]))
                   for o in outs):
            continue
        rows = _row_inputs(b, n, regions)
        if rows is None:
            continue
        inside.add(id(n))
        aligned[id(n)] = rows
    return _Segment([n for n in nodes if id(n) in inside], aligned)


def _row_inputs(b: Builder, n: gs.Node, regions: int) -> list[int] | None:
    """The positions of node n's row-aligned inputs when n is row-wise on a region axis of length `regions`, else
    None."""
    if (n.domain or "") not in ("", "ai.onnx"):
        return None
    shapes = [b.model.shape(t) if t.name else () for t in n.inputs]
    outs = [b.model.shape(o) for o in n.outputs]
    if not outs or any(not s or s[0] != regions for s in outs) or not all(_typed(b, o) for o in n.outputs):
        return None
    out = outs[0]
    rows = _aligned_positions(b, n, shapes, out, regions)
    return rows if rows is not None and all(_typed(b, n.inputs[i]) for i in rows) else None


def _typed(b: Builder, t: gs.Tensor) -> bool:
    """Of the gradient's float type: a row view is a Gather of the forward tensor, in its type (a narrower float,
    widened by the rules' b.op when it is a forward tensor, would not be once gathered)."""
    return t.dtype is not None and np.dtype(t.dtype) == b.dtype


def _aligned_positions(b: Builder, n: gs.Node, shapes: list, out: tuple, regions: int) -> list[int] | None:
    """_row_inputs for node n of this op, given its inputs' shapes and its output's."""
    if n.op in _ELEMENTWISE:
        return _broadcast_rows(shapes, out, regions)
    if n.op == "Gemm":
        rest = _broadcast_rows(shapes[2:], out, regions)
        ok = not int(n.attrs.get("transA", 0)) and _aligned(shapes[0], regions) and rest is not None
        return [0, *(2 + i for i in rest)] if ok else None
    if n.op == "MatMul":
        return [0] if _aligned(shapes[0], regions) and len(shapes[0]) >= 2 and len(shapes[1] or ()) == 2 else None
    if n.op in _RESHAPES:
        same = _aligned(shapes[0], regions) and _size(shapes[0][1:]) is not None and \
            _size(shapes[0][1:]) == _size(out[1:])
        return [0] if same else None
    if n.op in ("Softmax", "LogSoftmax"):
        rank = len(shapes[0] or ())
        axis = int(n.attrs.get("axis", 1 if b.opset < 13 else -1))
        row_wise = axis >= 1 if b.opset < 13 else axis % max(rank, 1) != 0
        return [0] if _aligned(shapes[0], regions) and row_wise else None
    if n.op == "Transpose":
        perm = list(n.attrs.get("perm", []))
        return [0] if _aligned(shapes[0], regions) and perm and int(perm[0]) == 0 else None
    if n.op in _BATCHED:
        return [0] if _aligned(shapes[0], regions) and len(n.outputs) == 1 else None
    return None


def _aligned(shape: tuple | None, regions: int) -> bool:
    return bool(shape) and shape[0] == regions


def _size(dims: tuple) -> int | None:
    """The element count of static dims, None when one is unknown."""
    return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else None


def _broadcast_rows(shapes: list, out: tuple, regions: int) -> list[int] | None:
    """Operands of a broadcasting op with output `out`: the positions of the row-aligned ones (same rank, first
    axis R); None when an operand's first axis meets the rows otherwise (of unknown rank, or neither R nor 1)."""
    rows = []
    for i, s in enumerate(shapes):
        if s is None:
            return None
        if len(s) == len(out) and s and s[0] == regions:
            rows.append(i)
        elif len(s) == len(out) and s and s[0] != 1:
            return None
    return rows


def _row_walk(b: Builder, nodes: list[gs.Node], on_path: set[str], score: gs.Tensor, segment: _Segment,
              seeded: gs.Tensor) -> tuple[list[gs.Node], set[str], gs.Tensor]:
    """(the walk's nodes, the tensors on its path, the score's rows): the nodes off the segment, then the Gathers
    of the segment's entries on the path, then the segment's row views. The segment's outputs on the path are read
    by its own nodes only, so it can come last in the walk's (topological) order."""
    views: dict[str, gs.Tensor] = {}
    made = {id(t) for n in segment.nodes for t in n.outputs}
    entries = []  # the Gathers of the entries on the path

    def rows_of(t: gs.Tensor) -> gs.Tensor:
        if t.name not in views:
            view = b.op("Gather", t, seeded, axis=0, widen=False)  # of the gradient's type (_row_inputs)
            view.dtype, view.shape = b.dtype, [ROWS_DIM, *b.model.shape(t)[1:]]
            views[t.name] = view
            if id(t) not in made and t.name in on_path:  # an entry: the walk sends its rows' gradient back to it
                entries.append(view.inputs[0])
        return views[t.name]

    row_views = []
    for n in segment.nodes:
        b.node = n
        row_views.append(RowView(n.op, n.name, n.attrs, n.domain,
                                 [rows_of(t) if i in segment.aligned[id(n)] else t for i, t in enumerate(n.inputs)],
                                 [rows_of(t) for t in n.outputs]))
    on_path = on_path | {views[name].name for name in on_path if name in views}
    inside = {id(n) for n in segment.nodes}
    return [n for n in nodes if id(n) not in inside] + entries + row_views, on_path, views[score.name]


def roi_rows(b: Builder, nodes: list[gs.Node], seed: gs.Tensor) -> set[int]:
    """The RoiAlign nodes among `nodes` (the walk's) whose gradient runs on the regions whose incoming gradient is
    nonzero only: {id(node)} (roi_rows_gradient).

    A per-region seed weighs a few regions, and the rows of the crops' gradient of every other region are zero (the
    box head acts on each row alone: region_rows; and Faster R-CNN's merge of the FPN levels' crops only moves
    rows). RoiAlign's rule would still lay out the sampling weights of all R regions and multiply them by those
    zeros (on fasterrcnn_mobilenet_v3_large_320_fpn, once region_rows had run, 17 of the gradient's 30 ms).
    Precondition: the seed is a per-region seed (Builder.region_seeds), the RoiAlign is ai.onnx's.
    """
    if "roi_rows" not in b.passes or seed.name not in b.region_seeds:
        return set()
    return {id(n) for n in nodes if n.op == "RoiAlign" and (n.domain or "") in ("", "ai.onnx")}


def roi_rows_gradient(b: Builder, n: gs.Node, gy: list, rule) -> list:
    """The makers of RoiAlign node `n` chosen by roi_rows: its rule's, on a row view that reads the regions (and
    their batch indices) whose rows of gy hold a nonzero, with those rows of gy. Exact: a zero row adds zeros; a
    row holding a NaN is kept (it is no zero)."""
    size = b.reduce("ReduceMax", b.op("Abs", gy[0]), [1, 2, 3], keepdims=False)  # (R,)
    carried = b.squeeze(b.op("NonZero", b.op("Not", b.op("Equal", size, 0.0))), [0])
    rows = [b.op("Gather", t, carried, axis=0, widen=False) for t in n.inputs[1:3]]
    view = RowView(n.op, n.name, n.attrs, n.domain, [n.inputs[0], *rows], list(n.outputs))
    return rule.fn(b, view, [b.op("Gather", gy[0], carried, axis=0)])
