"""Rewrites of the finished gradient graph. A rule sees one forward node while the walk is under way; a pass runs
once every gradient node exists, so it sees every reader of a tensor and can change a node that other branches
might read (Add, Sum, Identity and Expand hand one gradient tensor to several rules).
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from .builder import Builder

__all__ = ["fold_crops"]

log = logging.getLogger(__name__)

_TO_THE_END = 2**31 - 1  # a Slice end at least this large keeps the whole axis


def fold_crops(b: Builder) -> int:
    """Fold crops into the stride-1 Conv adjoints that feed them; return how many were folded.

    Exporters put an explicit Pad before convolutions ("same" padding computed at run time, TF's explicit pads);
    the Pad rule crops the incoming gradient with a step-less Slice. When that gradient is a stride-1 Conv (the
    adjoint of the next convolution), the crop by (a, e) on a spatial axis is the same Conv with its pads reduced
    by (a, e): the Slice, a copy, goes. Precondition: the Conv's output has no reader but the Slice and is no
    graph output, since a gradient can be another branch's too.
    """
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
