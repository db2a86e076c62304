"""One forward, several seeds: the backward of a batch of seeds over one sample's forward.

`onnxcam explain` explains a picture's items (detections, classes, characters) as a batch of copies of the image,
one seed each, so the forward ran once per item. Every gradient node depends on the sample only through the
forward tensors it reads; read through an Expand to the seed's batch, those are the same values the copies would
have computed, so the backward of S seeds runs over one forward and gives, seed for seed, the copies' gradients
(the same ops on the same values). `tools/bench_tasks.py --free-batch --shared 5`, one thread: five detections
of one picture on a YOLOX-style net cost 92.6 ms at the automatic layer against 177.3 ms as five copies (161.9
against 249.3 at dark3); three class maps of LRASPP 28.0 against 63.3 ms.

Preconditions, checked (share_forward raises LayerError, and the Explainer keeps the copies): the model's batch is
free and the seed dense with one seed per sample; every forward tensor a gradient node reads either has no batch
axis (weights, shapes) or is a float map whose batch is its first axis. An integer tensor must be constant, or
computed from shapes alone to the same value at any batch (checked at batches 1, 2 and 7: a chunk's bounds from
Shape(x)[1]); integer tensors that hold positions with the batch offset (MaxPool's Indices, NonZero's
coordinates) or per-sample choices (TopK's classes), and tensors whose batch is folded into another axis, cannot
be broadcast: those graphs are refused.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import LayerError, OnnxCamError
from ..graph.inputs import BATCH
from .builder import Builder

__all__ = ["SEEDS", "share_forward"]

SEEDS = "onnxcam_seeds"  # the symbol of the seeds' batch axis, apart from the forward's BATCH


def share_forward(b: Builder, seed: gs.Variable) -> None:
    """Read every batched forward tensor of the gradient nodes (If branches included) through an Expand to the
    batch of graph input `seed`, and declare the gradient tensors' batch as SEEDS."""
    gradient = _gradient_nodes(b)
    made = {id(t) for n in gradient for t in n.outputs}
    count = _seed_count(b, seed)
    expanded: dict[int, gs.Tensor] = {}
    for n in gradient:
        for k, t in enumerate(n.inputs):
            if isinstance(t, gs.Constant) or not t.name or id(t) in made or t is seed:
                continue
            if id(t) not in expanded:
                expanded[id(t)] = _expanded(b, t, count)
            if expanded[id(t)] is not None:
                n.inputs[k] = expanded[id(t)]
    seed.shape = [SEEDS, *seed.shape[1:]]
    for n in gradient:
        for t in n.outputs:
            if t.shape and t.shape[0] == BATCH:
                t.shape = [SEEDS, *t.shape[1:]]
    for t in b.graph.outputs:
        if id(t) in made and t.shape and t.shape[0] == BATCH:
            t.shape = [SEEDS, *t.shape[1:]]


def _gradient_nodes(b: Builder) -> list[gs.Node]:
    """The builder's nodes in the main graph and every node of their If branches (skip_zero_slabs'), whose
    else-branches read forward tensors' shapes for their zeros."""
    nodes = []
    for n in b.graph.nodes:
        if n.name in b.origins:
            nodes.append(n)
            for value in n.attrs.values():
                if isinstance(value, gs.Graph):
                    nodes.extend(value.nodes)
    return nodes


def _seed_count(b: Builder, seed: gs.Variable) -> gs.Tensor:
    """The seed's batch size, (1,) int64."""
    return b.slice(b.op("Shape", seed, widen=False), [0], [1], [0])


def _expanded(b: Builder, t: gs.Tensor, count: gs.Tensor) -> gs.Tensor | None:
    """t broadcast to `count` samples (None: t is the same for every sample and stays), or LayerError."""
    if t.dtype is None or not np.issubdtype(np.dtype(t.dtype), np.floating):
        if _same_at_every_batch(b, t):
            return None  # constants (static sizes, axes), or sizes computed from static dims (a chunk's halves)
        raise LayerError(f"forward tensor {t.name!r}, which the gradient reads, is {np.dtype(t.dtype or np.int64)}: "
                         "positions, choices or sizes per sample, which no broadcast makes another sample's")
    shape = b.model.shape(t)
    if shape is None:
        raise LayerError(f"forward tensor {t.name!r}, which the gradient reads, has no known shape")
    batched = [axis for axis, d in enumerate(shape) if d == BATCH]
    if not batched:
        if any(d is None for d in shape):
            raise LayerError(f"forward tensor {t.name!r}, which the gradient reads, has unknown dims {shape}")
        return None  # weights, or a statistic over the batch (the same over copies of one sample)
    if batched != [0]:
        raise LayerError(f"forward tensor {t.name!r}, which the gradient reads, has its batch on axes {batched}")
    target = b.op("Concat", count, b.ints([1] * (len(shape) - 1)), axis=0, widen=False)
    out = b.op("Expand", t, target, widen=False)
    out.dtype, out.shape = t.dtype, [SEEDS, *shape[1:]]
    return out


def _same_at_every_batch(b: Builder, t: gs.Tensor) -> bool:
    """Whether t is a constant or computed from shapes alone, to the same value whatever the batch (taken as 1, 2
    and 7): a torch export's chunk of a free-batch map computes its halves from Shape(x)[1]."""
    try:
        values = [b.model.value_at_batch(t, n) for n in (1, 2, 7)]
    except OnnxCamError:
        return False
    return values[0] is not None and all(v is not None and np.array_equal(v, values[0]) for v in values[1:])

