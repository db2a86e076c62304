"""One forward, several seeds: the backward of a batch of seeds over one sample's forward.

`onnxcam explain` explains a picture's items (detections, classes, characters) as a batch of copies of the image,
one seed each, so the forward ran once per item. Every gradient node depends on the sample only through the
forward tensors it reads. Here the forward runs on the one sample and the gradient nodes on the seeds' batch:
the nodes that read no seed (the rules' factors: a SiLU's slope, a ReLU's mask) compute once, on the sample, where
they are per-sample ops of float or bool maps; a node that meets the seeds reads such one-sample maps as they are
where its op broadcasts (a slope times a gradient), else through an Expand to the seeds' batch. The values are the
ones the copies would have computed, so each seed gets the copies' gradient (up to the order of float sums).
`tools/bench_tasks.py --model yolox --shared 5`, one thread: five detections of one picture on a YOLOX-style
net cost 73.2 ms at the automatic layer against 142.1 ms as five copies (131.8 against 207.9 at dark3).

Preconditions, checked (share_forward raises LayerError, and the Explainer keeps the copies): the model's batch is
free (Explainer.free_batch frees a batch-1 export's where it can) and the seed dense with one seed per sample;
every forward tensor a gradient node reads either has no batch axis (weights, shapes) or is a float map whose
batch is its first axis. An integer tensor must be constant, or computed from shapes alone to the same value at
any batch (checked at batches 1, 2 and 7: a chunk's bounds from Shape(x)[1]); integer tensors that hold positions
with the batch offset (MaxPool's Indices, NonZero's coordinates) or per-sample choices (TopK's classes), and
tensors whose batch is folded into another axis, cannot be broadcast: those graphs are refused.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import LayerError, OnnxCamError
from ..graph.inputs import BATCH
from .builder import Builder

__all__ = ["SEEDS", "share_forward"]

SEEDS = "onnxcam_seeds"  # the symbol of the seeds' batch axis, apart from the forward's BATCH


# Gradient ops that compute one sample's values from that sample alone, so that with inputs of the forward's one
# sample they compute once what every seed would (a SiLU's slope, a ReLU's mask, a MaxPool's positions as maps).
_PER_SAMPLE = {"Sigmoid", "Tanh", "Relu", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Cast", "Not", "Sign",
               "Floor", "Ceil", "Clip", "HardSigmoid", "HardSwish", "LeakyRelu", "Erf", "Softplus", "Identity",
               "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
# Ops whose inputs broadcast (numpy's rules, opset 8 on): a one-sample input meets the seeds' batch as it is.
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Greater", "Less", "GreaterOrEqual",
                 "LessOrEqual", "And", "Or", "Xor", "Max", "Min", "Sum", "Mean"}


def share_forward(b: Builder, seed: gs.Variable) -> None:
    """Declare the gradient tensors' batch as SEEDS, the batch of graph input `seed`. A gradient node that reads
    no seed computes at the forward's batch of one where it is a per-sample op of one-sample maps with a float or
    bool output (the rules' factors: computed once, not per seed); a node that meets the seeds' batch reads the
    one-sample maps as they are where its op broadcasts, else through an Expand to the seeds' batch."""
    gradient = _gradient_nodes(b)
    made = {id(t) for n in gradient for t in n.outputs}
    once = _computed_once(b, gradient, seed, made)
    count = _seed_count(b, seed)
    expanded: dict[int, gs.Tensor] = {}
    for n in gradient:
        if n.outputs and id(n.outputs[0]) in once:
            continue
        for k, t in enumerate(n.inputs):
            if isinstance(t, gs.Constant) or not t.name or t is seed or (id(t) in made and id(t) not in once):
                continue
            if n.op in _BROADCASTING and b.opset >= 8 and (id(t) in once or _map_of(b, t, {}, made)):
                continue  # a float or bool map (not positions), broadcast by the op itself
            if id(t) not in expanded:
                expanded[id(t)] = _expanded(b, t, count, once.get(id(t)))
            if expanded[id(t)] is not None:
                n.inputs[k] = expanded[id(t)]
    seed.shape = [SEEDS, *seed.shape[1:]]
    for n in gradient:
        for t in n.outputs:
            if id(t) not in once and t.shape and t.shape[0] == BATCH:
                t.shape = [SEEDS, *t.shape[1:]]
    for t in b.graph.outputs:
        if id(t) in made and t.shape and t.shape[0] == BATCH:
            t.shape = [SEEDS, *t.shape[1:]]


def _computed_once(b: Builder, gradient: list[gs.Node], seed: gs.Variable, made: set) -> dict[int, int]:
    """{id of a tensor: its rank} for the gradient tensors computed once, at the forward's batch: the outputs of
    the gradient nodes that read no seed, directly or not, each a per-sample op (_PER_SAMPLE, or a broadcasting
    one) of one-sample maps (the forward's float and bool maps with the batch first, or tensors computed once)
    whose output is a float or bool map (not integers: they may be positions with the batch in them), none of
    them an If branch's or the graph's output."""
    seeded = {id(seed)}
    changed = True
    while changed:  # If branches read outer tensors: repeat until nothing changes
        changed = False
        for n in gradient:
            if any(id(t) in seeded for t in n.inputs) or any(id(t) in seeded for t in _branch_outputs(n)):
                for t in n.outputs:
                    if id(t) not in seeded:
                        seeded.add(id(t))
                        changed = True
    fixed = {id(t) for t in b.graph.outputs}
    for n in gradient:
        fixed.update(id(t) for t in _branch_outputs(n))
    maps: dict[int, tuple] = {}  # id -> (rank, kind "f" or "b")
    for n in gradient:  # topological within each graph: a node kept reads forward tensors or kept nodes' outputs
        if len(n.outputs) != 1 or id(n.outputs[0]) in seeded or id(n.outputs[0]) in fixed:
            continue
        found = _one_sample_output(b, n, maps, made)
        if found is not None:
            maps[id(n.outputs[0])] = found
    return {key: rank for key, (rank, _) in maps.items()}


_BOOL_OPS = {"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Not"}


def _one_sample_output(b: Builder, n: gs.Node, maps: dict, made: set) -> tuple | None:
    """(rank, kind) of n's output when n may compute at the forward's batch of one, else None."""
    if n.op not in _PER_SAMPLE and n.op not in _BROADCASTING:
        return None
    inputs = [_map_of(b, t, maps, made) for t in n.inputs]
    if inputs[0] is None and n.op in _PER_SAMPLE:
        return None
    ranked = [m for m in inputs if m is not None]
    if not ranked:
        return None
    rank = max(r for r, _ in ranked)
    if n.op in _BROADCASTING:
        for t, m in zip(n.inputs, inputs):
            if m is None and not _broadcasts_under(b, t, rank, made):
                return None
    kind = _kind(b, n, inputs)
    return None if kind is None else (rank, kind)


def _map_of(b: Builder, t: gs.Tensor, maps: dict, made: set) -> tuple | None:
    """(rank, kind) of a one-sample map: a kept gradient tensor, or a forward float or bool map with the batch
    first; None for anything else (constants, weights, the seeds' tensors)."""
    if id(t) in maps:
        return maps[id(t)]
    if id(t) in made or isinstance(t, gs.Constant) or t.dtype is None or not _batch_first_map(b, t):
        return None
    kind = _kind_of(t.dtype)
    return None if kind is None else (len(b.model.shape(t)), kind)


def _broadcasts_under(b: Builder, t: gs.Tensor, rank: int, made: set) -> bool:
    """A constant or weight that broadcasts against a one-sample map of `rank` without widening its batch."""
    if id(t) in made:
        return False
    shape = tuple(t.shape) if isinstance(t, gs.Constant) else b.model.shape(t)
    if shape is None or BATCH in shape or any(not isinstance(d, int) for d in shape):
        return False
    return len(shape) < rank or (len(shape) == rank and shape[0] == 1)


def _kind(b: Builder, n: gs.Node, inputs: list) -> str | None:
    """"f" or "b": the dtype kind of n's output (None for integers or unknown)."""
    if n.op in _BOOL_OPS:
        return "b"
    if n.op == "Cast":
        return _kind_of(onnx.helper.tensor_dtype_to_np_dtype(n.attrs["to"]))
    values = inputs[1:] if n.op == "Where" else inputs
    tensors = n.inputs[1:] if n.op == "Where" else n.inputs
    for t, m in zip(tensors, values):
        if m is not None:
            return m[1]
        if t.dtype is not None:
            return _kind_of(t.dtype)
    return None


def _kind_of(dtype) -> str | None:
    """"f" for a float type, "b" for bool, None for anything else."""
    dtype = np.dtype(dtype)
    return "f" if np.issubdtype(dtype, np.floating) else "b" if dtype == np.bool_ else None


def _branch_outputs(n: gs.Node) -> list[gs.Tensor]:
    return [t for value in n.attrs.values() if isinstance(value, gs.Graph) for t in value.outputs]


def _batch_first_map(b: Builder, t: gs.Tensor) -> bool:
    """t's known shape has the batch on its first axis, and only there."""
    shape = b.model.shape(t)
    return bool(shape) and shape[0] == BATCH and BATCH not in shape[1:] and all(d is not None for d in shape[1:])


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


def _expanded(b: Builder, t: gs.Tensor, count: gs.Tensor, rank: int | None = None) -> gs.Tensor | None:
    """t broadcast to `count` samples (None: t is the same for every sample and stays), or LayerError. rank: t is
    a gradient tensor computed once, a one-sample map of that rank."""
    if rank is not None:
        out = b.op("Expand", t, b.op("Concat", count, b.ints([1] * (rank - 1)), axis=0, widen=False), widen=False)
        out.dtype = t.dtype
        return out
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

