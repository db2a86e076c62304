"""Selections whose indices are data: TopK, GatherND, GatherElements, and Slice with bounds computed at run time
(shape.py's Slice rule hands those over). Each gradient scatters the incoming gradient back to the positions that
were read: into zeros shaped like the input, adding where a position was read twice. Detectors exported whole (SSD, RetinaNet)
pick their scores with TopK and GatherND; chunk() in a TorchScript export with a dynamic batch slices at offsets
computed from Shape.
"""

from __future__ import annotations

import numpy as np

from . import rule


def _input(n, i):
    return n.inputs[i] if i < len(n.inputs) and n.inputs[i].name else None


def _int64(b, t):
    return t if t.dtype == np.int64 else b.cast(t, np.int64)


# ---- TopK --------------------------------------------------------------------------------------------------------

@rule("TopK")
def _topk(b, n, gy):
    """Values = x at Indices along the axis: gy goes back to those positions (distinct within a row, so a plain
    ScatterElements suffices); the Indices output has no gradient. A TopK that does not write its Indices gets a
    twin in the gradient graph that does."""
    x = n.inputs[0]
    axis = int(n.attrs.get("axis", -1)) % len(b.shape(x))

    def grad():
        indices = n.outputs[1] if len(n.outputs) > 1 and n.outputs[1].name else None
        if indices is None:
            k = {"k": n.attrs["k"]} if b.opset < 10 else {}
            twin_attrs = {a: v for a, v in n.attrs.items() if a != "k"}
            indices = b.op("TopK", *n.inputs, outputs=2, widen=False, **k, **twin_attrs)[1]
        scatter = "ScatterElements" if b.opset >= 11 else "Scatter"
        return b.op(scatter, b.zeros_like(x), indices, gy[0], axis=axis)
    return (grad,) + (None,) * (len(n.inputs) - 1)


@rule("ScatterElements", opsets=(11, 10_000))
def _scatter_elements(b, n, gy):
    """y = data with `updates` written (or added) at `indices` along the axis. The updates get gy read back at
    those positions (GatherElements); the data gets gy where it was kept: all of it when the updates are added,
    gy with the written positions zeroed otherwise. MaxPool's and TopK's gradients are such scatters, so a second
    derivative (ShapleyCAM's Hessian-vector product) passes through them. Positions written twice without a
    reduction are undefined in ONNX; mul/max/min reductions are refused."""
    data, indices, _ = n.inputs[:3]
    axis = int(n.attrs.get("axis", 0)) % len(b.shape(data))
    _, data_grad = _scatter_data_grad(b, n, gy, "ScatterElements", axis=axis)
    return (data_grad, None, lambda: b.op("GatherElements", gy[0], indices, axis=axis))


def _scatter_data_grad(b, n, gy, op: str, **attrs):
    """(reduction, the data's gradient) of a scatter node `op`: all of gy when the updates are added, gy with the
    written positions zeroed (the same scatter, of zeros) otherwise; mul/max/min reductions are refused."""
    _, indices, updates = n.inputs[:3]
    reduction = n.attrs.get("reduction", "none")
    if reduction not in ("none", "add"):
        raise b.error(f"has reduction {reduction!r}; only 'none' and 'add' are differentiated")

    def data_grad():
        if reduction == "add":
            return gy[0]
        return b.op(op, gy[0], indices, b.zeros_like(updates), **attrs)
    return reduction, data_grad


@rule("ScatterND", opsets=(11, 10_000))
def _scatter_nd(b, n, gy):
    """y = data with `updates` written (or added) at the index tuples of `indices`: ScatterElements' rule with
    GatherND reading gy back. The data gets all of gy when the updates are added, gy with the written slices zeroed
    otherwise; the updates get gy read at their indices. The gradients of GatherND and of run-time Gathers and Slices
    are such scatters, so a second derivative (ShapleyCAM) passes through them. Mul/max/min reductions are refused.

    An index written twice without a reduction leaves ONNX's result undefined: constant indices that repeat are
    refused when the updates need a gradient; indices computed at run time are taken as distinct, and each update
    gets gy at its index whichever write the runtime kept (torch's index_put does the same)."""
    data, indices, updates = n.inputs[:3]
    reduction, data_grad = _scatter_data_grad(b, n, gy, "ScatterND")

    def updates_grad():
        if reduction == "none" and not _distinct(b.model.value(indices), b.shape(data), unknown=True):
            raise b.error(f"writes some index of its constant indices {indices.name!r} twice without a reduction "
                          f"(undefined in ONNX), so the gradient of its updates {updates.name!r} is undefined")
        return b.op("GatherND", gy[0], indices)
    return (data_grad, None, updates_grad)


# ---- GatherND ----------------------------------------------------------------------------------------------------

@rule("GatherND")
def _gather_nd(b, n, gy):
    """y[i..., :] = data[batch..., idx[i...]]: ScatterND(reduction='add') of gy into zeros (repeated indices add up).
    With batch_dims > 0 the batch axes are flattened into one and each index gets its batch position prepended,
    since ScatterND has no batch_dims. Negative indices count from the end."""
    data, idx = n.inputs[:2]
    batch_dims = int(n.attrs.get("batch_dims", 0))
    if b.opset < 16 and not (batch_dims == 0 and _distinct(b.model.value(idx), b.shape(data))):
        raise b.error("needs ScatterND reduction='add' (opset 16+) to add up the gradients of indices that may "
                      "repeat; below opset 16 only constant, distinct indices (batch_dims 0) are supported")
    depth = b.static_dims(idx, [-1])[0]
    rank = len(b.shape(data))

    def grad():
        shape = b.shape_of(data)
        i = _int64(b, idx)
        dims = b.slice(shape, [batch_dims], [batch_dims + depth], [0])
        i = b.op("Where", b.op("Less", i, b.ints(0)), b.op("Add", i, dims), i)
        zeros, g = b.zeros_like(data), gy[0]
        if batch_dims:
            flat = b.op("Concat", b.ints([-1]), b.slice(shape, [batch_dims], [rank], [0]), axis=0)
            zeros = b.op("Reshape", zeros, flat)
            i = _with_batch_position(b, i, batch_dims, len(b.shape(idx)))
            g = b.op("Reshape", g, b.op("Concat", b.ints([-1]), b.slice(b.shape_of(g), [batch_dims], [2**62], [0]),
                                        axis=0))
        kw = {"reduction": "add"} if b.opset >= 16 else {}
        out = b.op("ScatterND", zeros, i, g, **kw)
        return b.op("Reshape", out, shape) if batch_dims else out
    return (grad, None)


# ---- GatherElements ----------------------------------------------------------------------------------------------

@rule("GatherElements", opsets=(11, 10_000))
def _gather_elements(b, n, gy):
    """y[..., k, ...] = data[..., idx[..., k, ...], ...] along the axis (torch.gather): gy is added back to the
    positions read, ScatterElements(reduction='add') into zeros shaped like the data; repeated indices add up,
    negative ones count from the end, and indices shorter than the data on other axes leave the rest zero. Below
    opset 16 ScatterElements cannot add: constant indices that read each position once scatter plainly, any others
    go through their one-hot rows (_one_hot_add). The indices get no gradient."""
    data, idx = n.inputs[:2]
    rank = len(b.shape(data))
    axis = int(n.attrs.get("axis", 0)) % rank

    def grad():
        if b.opset >= 16:
            return b.op("ScatterElements", b.zeros_like(data), idx, gy[0], axis=axis, reduction="add")
        if _distinct_along(b.model.value(idx), b.shape(data), axis):
            return b.op("ScatterElements", b.zeros_like(data), idx, gy[0], axis=axis)
        return _one_hot_add(b, data, idx, gy[0], axis, rank)
    return (grad, None)


def _distinct_along(known, dims: tuple, axis: int) -> bool:
    """True for constant GatherElements indices that read each position of the data at most once. The position an
    index reads is its own coordinates with the one on `axis` replaced by its value; a negative index is told from
    its positive twin only when that axis' size is static."""
    if known is None:
        return False
    known = np.asarray(known)
    if not (isinstance(dims[axis], int) and dims[axis] > 0) and np.any(known < 0):
        return False
    coords = np.indices(known.shape)
    coords[axis] = known
    return _distinct(np.moveaxis(coords, 0, -1), dims)


def _one_hot_add(b, data, idx, g, axis: int, rank: int):
    """ScatterElements(zeros like data, idx, g, reduction='add') in ops that predate opset 16: the one-hot rows of
    the indices over data's `axis` (a new last axis) times g, summed over `axis`, that last axis moved to `axis`,
    then zero-padded at the end of the axes where the indices are shorter than the data. Costs one float per index
    and position of the axis."""
    shape = b.shape_of(data)
    rows = b.op("OneHot", idx, b.slice(shape, [axis], [axis + 1], [0]), np.array([0, 1], b.dtype), axis=-1)
    summed = b.reduce("ReduceSum", b.op("Mul", b.unsqueeze(g, [rank]), rows), [axis], keepdims=False)
    perm = list(range(rank - 1))
    perm.insert(axis, rank - 1)
    out = b.op("Transpose", summed, perm=perm)
    dims, idims = b.shape(data), b.shape(idx)
    if all(d is not None and d == i for a, (d, i) in enumerate(zip(dims, idims)) if a != axis):  # same dims
        return out
    return b.op("Pad", out, b.op("Concat", b.ints([0] * rank), b.op("Sub", shape, b.shape_of(out)), axis=0))


def _distinct(known, dims: tuple, unknown: bool = False) -> bool:
    """True for constant GatherND/ScatterND indices that name every position at most once (-1 and dims[k] - 1 are
    one position where the dim is static); `unknown` for indices computed at run time."""
    if known is None:
        return unknown
    rows = np.asarray(known).reshape(-1, np.shape(known)[-1])
    sizes = [d if isinstance(d, int) and d > 0 else 0 for d in dims]
    rows = [tuple(i % d if d else i for i, d in zip(r, sizes)) for r in rows.tolist()]
    return len(set(rows)) == len(rows)


def _with_batch_position(b, i, batch_dims: int, rank: int):
    """Indices [B..., I..., q] (of rank `rank`) -> [P, I..., 1 + q] over the batch axes flattened to P: each index
    prefixed by the flat position of its batch."""
    ishape = b.shape_of(i)
    i = b.op("Reshape", i, b.op("Concat", b.ints([-1]), b.slice(ishape, [batch_dims], [rank], [0]), axis=0))
    flat_shape = b.shape_of(i)
    count = b.slice(flat_shape, [0], [1], [0])
    pos = b.op("Range", b.ints(0), b.squeeze(count, [0]), b.ints(1))
    pos = b.op("Reshape", pos, b.ints([-1] + [1] * (rank - batch_dims)))
    pos = b.op("Expand", pos, b.op("Concat", b.slice(flat_shape, [0], [-1], [0]), b.ints([1]), axis=0))
    return b.op("Concat", pos, i, axis=-1)


# ---- Slice with run-time bounds (called by shape.py's Slice rule) ---------------------------------------------------

def slice_at_run_time(b, n, gy):
    """A Slice whose starts or ends are computed at run time (axes and steps must be constants). Unit steps: the
    gradient is gy zero-padded by pads computed from the clamped bounds (ONNX's rule: negative bounds count from
    the end, then clamp to [0, size]). Other steps: the positions read are the same Slice of Range(size), and gy
    is scattered to them along the axis."""
    x, starts, ends = n.inputs[:3]
    rank = len(b.shape(x))
    count = b.static_dims(starts, [0])[0]
    axes = _constant(b, n, 3, "axes")
    steps = _constant(b, n, 4, "steps")
    axes = list(range(count)) if axes is None else [int(a) % rank for a in axes]
    steps = [1] * count if steps is None else [int(s) for s in steps]
    if b.opset < 11:
        raise b.error("has run-time bounds; their gradient needs Pad and Range with tensor inputs (opset 11+)")

    def grad():
        shape = b.shape_of(x)
        s_all, e_all = _int64(b, starts), _int64(b, ends)
        g, begin, end = gy[0], [b.ints([0])] * rank, [b.ints([0])] * rank
        for k, (a, step) in enumerate(zip(axes, steps)):
            size = b.slice(shape, [a], [a + 1], [0])
            s, e = b.slice(s_all, [k], [k + 1], [0]), b.slice(e_all, [k], [k + 1], [0])
            if step == 1:
                lo = _clamped(b, s, size)
                hi = b.op("Max", _clamped(b, e, size), lo)
                begin[a], end[a] = lo, b.op("Sub", size, hi)
            else:
                g = _scatter_along(b, g, x, a, rank, b.op("Slice", b.op("Range", b.ints(0), b.squeeze(size, [0]),
                                                                          b.ints(1)), s, e, b.ints([0]),
                                                           b.ints([step])))
        if any(st == 1 for st in steps):
            g = b.op("Pad", g, b.op("Concat", *begin, *end, axis=0), mode="constant")
        return g
    return (grad,) + (None,) * (len(n.inputs) - 1)


def _constant(b, n, i, what):
    t = _input(n, i)
    if t is None:
        return None
    v = b.value(t, what)
    return None if v.size == 0 else v


def _clamped(b, v, size):
    """A slice bound as ONNX reads it for a positive step: v + size when negative, then clamped to [0, size]."""
    v = b.op("Where", b.op("Less", v, b.ints(0)), b.op("Add", v, size), v)
    return b.op("Min", b.op("Max", v, b.ints([0])), size)


def _scatter_along(b, g, x, axis: int, rank: int, positions):
    """Zeros the size of x's `axis` (g's other dims), with g's slabs at `positions` of that axis."""
    to_front = [axis] + [a for a in range(rank) if a != axis]
    g = b.op("Transpose", g, perm=to_front) if axis else g
    dims = b.op("Concat", b.slice(b.shape_of(x), [axis], [axis + 1], [0]),
                b.slice(b.shape_of(g), [1], [rank], [0]), axis=0)
    zeros = b.op("ConstantOfShape", dims, value=_zero(b))
    out = b.op("ScatterND", zeros, b.unsqueeze(positions, [1]), g)
    return b.op("Transpose", out, perm=[int(p) for p in np.argsort(to_front)]) if axis else out


def _zero(b):
    import onnx_graphsurgeon as gs
    return gs.Constant("zero", np.zeros(1, b.dtype))
