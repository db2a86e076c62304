"""Ops that move, select or copy elements. Reshapes map the gradient back with the input's run-time shape;
copies (Expand, Tile) sum it back; selections, paddings and interpolations act on each axis through a matrix
(Builder.axis_matmul), and their gradient is the product with the transposed matrix. The cheap special cases
that dominate real models avoid the matrix: a unit-step Slice's gradient is a zero Pad, a constant Pad's is a Slice.
Side inputs (starts, pads, scales, repeats...) must be constants.
"""

from __future__ import annotations

import numpy as np

from ...errors import UnsupportedOpError
from ...graph.evaluate import run_node
from ...graph.inputs import BATCH
from . import rule
from .resize_band import band_gradient, banded
from .select import slice_at_run_time

BIG = 2**62  # an end index past any axis, for Slice


def _attr(n, name, default=None):
    v = n.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


def _side_input(b, n, i, what):
    """The constant value of optional input i, or None when it is absent (or empty, as old opsets write it)."""
    if len(n.inputs) <= i or not n.inputs[i].name:
        return None
    v = b.value(n.inputs[i], what)
    return None if v.size == 0 else v


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b, n, gy):
    return (lambda: b.reshape_like(gy[0], n.inputs[0]), None)


@rule("Transpose")
def _transpose(b, n, gy):
    rank = len(b.shape(n.inputs[0]))
    perm = list(n.attrs.get("perm", range(rank)[::-1]))
    return (lambda: b.op("Transpose", gy[0], perm=[int(p) for p in np.argsort(perm)]),)


@rule("Concat")
def _concat(b, n, gy):
    """Each input gets its slab of gy along the axis."""
    rank = len(b.shape(n.outputs[0]))
    axis = int(n.attrs["axis"]) % rank
    sizes = [b.static_dims(x, [axis])[0] for x in n.inputs]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    def piece(i):
        return lambda: b.slice(gy[0], [offsets[i]], [offsets[i + 1]], [axis])
    return [piece(i) for i in range(len(n.inputs))]


@rule("Split")
def _split(b, n, gy):
    """The pieces' gradients concatenated back, zeros for pieces no gradient reaches. The outputs' own shapes say
    where each piece sits, whichever form (attribute, input, num_outputs) the split sizes take.
    """
    axis = int(n.attrs.get("axis", 0))
    return (lambda: b.op("Concat", *[g if g is not None else b.zeros_like(o) for g, o in zip(gy, n.outputs)],
                         axis=axis), None)


@rule("Expand", broadcast=True)
def _expand(b, n, gy):
    return (lambda: gy[0], None)


@rule("Tile")
def _tile(b, n, gy):
    """y = x repeated r_i times along each axis: view gy as [r_0, d_0, r_1, d_1, ...] and sum over the r_i."""
    x = n.inputs[0]
    repeats = [int(r) for r in b.value(n.inputs[1], "repeats")]
    shape = b.shape(x)
    dims = [d if isinstance(d, int) else -1 for d in shape]
    if dims.count(-1) > 1:
        raise b.error(f"needs static sizes of {x.name!r} (shape {shape}) but for one axis")

    def grad():
        g = b.op("Reshape", gy[0], b.ints([v for r, d in zip(repeats, dims) for v in (r, d)]))
        g = b.reduce("ReduceSum", g, [2 * i for i in range(len(dims))], keepdims=False)
        return g
    return (grad, None)


@rule("DepthToSpace", "SpaceToDepth")
def _depth_to_space(b, n, gy):
    """Both are a reshape, a transpose and a reshape: the gradient undoes them in reverse. SpaceToDepth is the
    inverse of DCR DepthToSpace; CRD mode is undone explicitly.
    """
    x = n.inputs[0]
    s = int(n.attrs["blocksize"])
    if n.op == "SpaceToDepth":
        return (lambda: b.op("DepthToSpace", gy[0], blocksize=s, mode="DCR"),)
    if _attr(n, "mode", "DCR") == "DCR":
        return (lambda: b.op("SpaceToDepth", gy[0], blocksize=s),)
    c, h, w = b.static_dims(x, [1, 2, 3])

    def grad():  # forward CRD: [N, C/s², s, s, H, W] -> perm (0, 1, 4, 2, 5, 3) -> [N, C/s², H*s, W*s]
        g = b.op("Reshape", gy[0], b.ints([0, c // (s * s), h, s, w, s]))
        g = b.op("Transpose", g, perm=[int(p) for p in np.argsort([0, 1, 4, 2, 5, 3])])
        return b.op("Reshape", g, b.ints([0, c, h, w]))
    return (grad,)


# ---- selections: Slice, Gather ---------------------------------------------------------------------------------

@rule("Slice")
def _slice(b, n, gy):
    """Unit-step axes: the gradient is gy padded with zeros back to the input's size. Other steps (negative ones
    reverse) go through the selection matrix of the axis, so repeated sampling and order are exact.
    """
    x = n.inputs[0]
    rank = len(b.shape(x))
    if b.opset < 10:
        starts, ends = n.attrs["starts"], n.attrs["ends"]
        axes, steps = n.attrs.get("axes"), None
    else:
        starts, ends = b.model.value(n.inputs[1]), b.model.value(n.inputs[2])
        if starts is None or ends is None:  # computed at run time (chunk with a dynamic batch): scatter back
            return slice_at_run_time(b, n, gy)
        axes, steps = _side_input(b, n, 3, "axes"), _side_input(b, n, 4, "steps")
    axes = range(len(starts)) if axes is None else [int(a) % rank for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    picks = {a: range(*slice(int(s), int(e), int(st)).indices(b.static_dims(x, [a])[0]))
             for a, s, e, st in zip(axes, starts, ends, steps) if not _whole(s, e, st)}

    def grad():
        if any(len(p) == 0 for p in picks.values()):
            return b.zeros_like(x)
        g, begin, end = gy[0], [0] * rank, [0] * rank
        for a, p in picks.items():
            size = b.static_dims(x, [a])[0]
            if p.step == 1:
                begin[a], end[a] = p.start, size - p.stop
            else:
                g = b.axis_matmul(g, a, rank, _selection(p, size))
        return b.pad(g, begin + end) if any(begin + end) else g
    return (grad,) + (None,) * (len(n.inputs) - 1)


def _whole(start, end, step) -> bool:
    """A [0:INT_MAX:1] slice keeps the whole axis, whatever its (maybe symbolic) size."""
    return int(start) == 0 and int(step) == 1 and int(end) >= 2**31 - 1


def _selection(picked, size: int) -> np.ndarray:
    """m[j, i] = 1 where output j reads input i: maps gy to the input; inputs read twice add up in the product."""
    m = np.zeros((len(picked), size))
    m[np.arange(len(picked)), np.asarray(picked, dtype=np.int64)] = 1.0
    return m


@rule("Gather")
def _gather(b, n, gy):
    """y takes the slices of x at the (constant) indices along one axis: gy goes back through the selection matrix,
    which adds up repeated indices. Index dims are flattened first; a scalar index removed the axis, so put it back.
    """
    x = n.inputs[0]
    shape = b.shape(x)
    rank = len(shape)
    axis = int(n.attrs.get("axis", 0)) % rank
    known = b.model.value(n.inputs[1])
    if known is None or not isinstance(shape[axis], int):
        return (_gather_scatter(b, n, gy, axis, rank), None)
    size = shape[axis]
    idx = np.asarray(known, dtype=np.int64)
    if np.any((idx < -size) | (idx >= size)):
        raise b.error(f"has indices outside [-{size}, {size})")

    def grad():
        g = gy[0]
        if idx.ndim == 0:
            g = b.unsqueeze(g, [axis])
        elif idx.ndim > 1:
            after = [d if isinstance(d, int) else -1 for d in shape[axis + 1:]]
            g = b.op("Reshape", g, b.ints([0] * axis + [idx.size] + after))
        return b.axis_matmul(g, axis, rank, _selection(idx.reshape(-1) % size, size))
    return (grad, None)


def _gather_scatter(b, n, gy, axis: int, rank: int):
    """Indices computed at run time (e.g. the dynamo exporter's as_strided flatten, which depends on the batch):
    scatter-add gy into zeros with ScatterND(reduction='add') along the gathered axis, moved to the front."""
    if b.opset < 16:
        raise b.error("has indices computed at run time; their gradient needs ScatterND reduction='add' (opset 16+)")
    x, idx = n.inputs
    k = len(b.shape(idx))

    def grad():
        to_front = [axis] + [a for a in range(rank) if a != axis]
        data = b.zeros_like(x)
        g = gy[0]
        if axis:
            data = b.op("Transpose", data, perm=to_front)
            g = b.op("Transpose", g, perm=list(range(axis, axis + k)) + list(range(axis)) +
                     list(range(axis + k, rank - 1 + k)))
        i = idx if idx.dtype == np.int64 else b.cast(idx, np.int64)
        size = b.op("Gather", b.shape_of(x), b.ints(axis))
        i = b.op("Where", b.op("Less", i, b.ints(0)), b.op("Add", i, size), i)  # negative indices count from the end
        out = b.op("ScatterND", data, b.unsqueeze(i, [k]), g, reduction="add")
        return b.op("Transpose", out, perm=[int(p) for p in np.argsort(to_front)]) if axis else out
    return grad


# ---- paddings: Pad -------------------------------------------------------------------------------------------

@rule("Pad")
def _pad(b, n, gy):
    """Constant mode: the gradient is gy cropped back (and zero-padded where the pads were negative, i.e. crops).
    Other modes (reflect, edge, wrap) copy input elements into the border: the gradient goes back through each
    padded axis' copy matrix, measured by running Pad itself on an identity basis so it follows the runtime.
    The crop is a plain Slice: where it is the only reader of a stride-1 Conv adjoint, autodiff/passes.py folds it
    into that Conv's pads once the whole gradient graph is known (a rule cannot see the gradient's other readers).
    """
    x = n.inputs[0]
    rank = len(b.shape(x))
    mode = _attr(n, "mode", "constant")
    if b.opset < 11:
        pads, axes = [int(p) for p in n.attrs["pads"]], list(range(rank))
    else:
        pads = [int(p) for p in b.value(n.inputs[1], "pads")]
        axes = _side_input(b, n, 3, "axes")
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    k = len(axes)
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[k + i]
    padded = [a for a in range(rank) if begin[a] or end[a]]

    def crop():
        if not padded:
            return gy[0]
        g = b.slice(gy[0], [max(begin[a], 0) for a in padded], [-end[a] if end[a] > 0 else BIG for a in padded],
                    padded)
        grow = [max(-p, 0) for p in begin] + [max(-p, 0) for p in end]
        return b.pad(g, grow) if any(grow) else g

    def through_matrices():
        g = gy[0]
        for a in padded:
            size = b.static_dims(x, [a])[0]
            g = b.axis_matmul(g, a, rank, _pad_matrix(b, mode, size, begin[a], end[a]).T)
        return g
    return (crop if mode == "constant" else through_matrices,) + (None,) * (len(n.inputs) - 1)


def _pad_matrix(b, mode: str, size: int, begin: int, end: int) -> np.ndarray:
    """m[i, j] = how much output j of a padded axis takes from input i: Pad run on the rows of an identity."""
    eye = np.eye(size, dtype=np.float32)
    if b.opset < 11:
        return run_node("Pad", [eye], {"mode": mode, "pads": [0, begin, 0, end]}, b.opset)[0]
    return run_node("Pad", [eye, np.array([0, begin, 0, end], np.int64)], {"mode": mode}, b.opset)[0]


# ---- interpolations: Resize, Upsample ------------------------------------------------------------------------

@rule("Resize", "Upsample")
def _resize(b, n, gy):
    """Every mode of Resize is separable: each resized axis maps through a matrix. Each axis' matrix is measured
    by running the op itself, with the node's attributes, on an identity basis laid along the channels of a
    [1, L, 1, L] input (only the last axis resized), so nearest_mode, coordinate transformations, cubic
    coefficients and antialiasing follow the runtime exactly; the gradient multiplies by the transposes, or, for
    an integer upsampling of a float32 map, runs each axis' band as a strided depthwise Conv (resize_band.py).
    """
    x = n.inputs[0]
    rank = len(b.shape(x))
    if _attr(n, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise b.error("uses keep_aspect_ratio_policy; not supported")

    def grad():
        return resize_adjoint(b, n, gy[0], b.shape(x)[1] if rank == 4 else None)
    return (grad,) + (None,) * (len(n.inputs) - 1)


def resize_adjoint(b, n, g, channels):
    """g (shaped like Resize n's output) times the transposes of n's per-axis matrices; `channels`: g's static
    channel count (a band or block sum is then one depthwise Conv per channel), None when unknown.
    passes_channels.py also calls it on the seeded class maps alone, as one channel."""
    x, y = n.inputs[0], n.outputs[0]
    in_shape, out_shape = b.shape(x), b.shape(y)
    rank = len(in_shape)
    scales, sizes, roi = _resize_params(b, n, rank)
    matrices = {}
    for a in range(rank):
        if _resizes_axis(scales, sizes, roi, in_shape, out_shape, a, n):
            size_in, size_out = b.static_dims(x, [a])[0], b.static_dims(y, [a])[0]
            matrices[a] = _resize_matrix(b, n, a, size_in, size_out, scales, sizes, roi, rank)
    blocks = _repeat_blocks(b, channels, matrices, rank)
    if blocks is not None:
        return _block_sums(b, channels, g, blocks)
    for a, m in matrices.items():
        found = (banded(m) if b.dtype == np.float32 and a >= 2 and isinstance(channels, int) else None)
        g = band_gradient(b, g, a, channels, m, found) if found else b.axis_matmul(g, a, rank, m.T)
    return g


def resizes_spatial_axes_only(b, n) -> bool:
    """Whether a rank-4 Resize n leaves the batch and channel axes as they are (scale 1, no crop); False when its
    scales or sizes are computed at run time."""
    in_shape, out_shape = b.shape(n.inputs[0]), b.shape(n.outputs[0])
    try:
        scales, sizes, roi = _resize_params(b, n, 4)
    except UnsupportedOpError:
        return False
    return not any(_resizes_axis(scales, sizes, roi, in_shape, out_shape, a, n) for a in (0, 1))


def _repeat_blocks(b, channels, matrices: dict, rank: int) -> list[int] | None:
    """Per spatial axis, the factor k by which a nearest-neighbour Resize repeats each element k times in a row
    (output j reads input j // k: the FPN's 2x upsampling); None when the resize is anything else.

    Its gradient is then the sum of each k_1 x k_2 block of gy: one depthwise Conv with ones, which onnxruntime
    runs about twice as fast as the two transposed matrix products (tools/bench_tasks.py). Precondition: only the
    spatial axes (2 on) are resized, the channel count is static, and the gradient is float32 (onnxruntime's
    Conv has no float64 kernel; other types keep the products).
    """
    if b.dtype != np.float32 or rank < 3 or any(a < 2 for a in matrices) or not matrices:
        return None
    if not isinstance(channels, int):
        return None
    blocks = []
    for a in range(2, rank):
        m = matrices.get(a)
        if m is None:
            blocks.append(1)
            continue
        size_in, size_out = m.shape
        k = size_out // size_in
        if k * size_in != size_out or not np.array_equal(m, np.arange(size_out)[None, :] // k
                                                          == np.arange(size_in)[:, None]):
            return None
        blocks.append(k)
    return blocks


def _block_sums(b, channels: int, g, blocks: list[int]):
    """The sum of each `blocks`-sized block of g, per channel: a depthwise Conv with ones, stride = kernel."""
    weight = np.ones([channels, 1] + blocks, np.float32)
    return b.op("Conv", g, weight, group=channels, kernel_shape=blocks, strides=blocks)


def _resize_params(b, n, rank):
    """Full-rank scales, sizes and roi (each None when absent), with Resize-18's `axes` expanded."""
    if n.op == "Upsample" or b.opset < 11:
        scales, sizes, roi = b.value(n.inputs[1], "scales"), None, None
    else:
        roi, scales = (_side_input(b, n, i, what) for i, what in ((1, "roi"), (2, "scales")))
        sizes = _resize_sizes(b, n)
    axes = [int(a) % rank for a in n.attrs.get("axes", range(rank))]

    def full(v, fill):
        if v is None:
            return None
        out = [fill] * rank
        for i, a in enumerate(axes):
            out[a] = v[i]
        return out
    if roi is not None:
        k = len(axes)
        roi = list(zip(full(roi[:k], 0.0), full(roi[k:], 1.0)))
    return full(scales, 1.0), full(sizes, None), roi


def _resize_sizes(b, n):
    """Resize n's sizes input: its constant value, or where it is computed at run time from the input's own shape
    (a free-batch export's Concat(Shape(x)[:2], sizes): the batch is not constant) the output's shape, batch
    included, when every other dim of it is static and the batch is the input's."""
    try:
        return _side_input(b, n, 3, "sizes")
    except UnsupportedOpError:
        in_shape, out_shape = b.shape(n.inputs[0]), b.shape(n.outputs[0])
        if (in_shape is None or out_shape is None or len(in_shape) != len(out_shape) or in_shape[0] != out_shape[0]
                or in_shape[0] != BATCH or not all(isinstance(d, int) for d in out_shape[1:])):
            raise
        return np.array([1, *out_shape[1:]], np.int64)  # the batch entry unused: the batch is not resized


def _resizes_axis(scales, sizes, roi, in_shape, out_shape, a, n) -> bool:
    """Whether axis a is transformed at all (scale 1 on an uncropped axis is the identity in every mode)."""
    crops = (_attr(n, "coordinate_transformation_mode") == "tf_crop_and_resize" and roi is not None
             and tuple(roi[a]) != (0.0, 1.0))
    same = in_shape[a] == out_shape[a] and (scales is None or float(scales[a]) == 1.0)
    return crops or not same


def _resize_matrix(b, n, axis, size_in, size_out, scales, sizes, roi, rank) -> np.ndarray:
    """m[i, j]: the weight of input i in output j along `axis`, measured on a [1, L, 1, L] identity basis."""
    basis = np.eye(size_in, dtype=np.float32).reshape(1, size_in, 1, size_in)
    attrs = {k: (np.asarray(v.values) if hasattr(v, "values") else v) for k, v in n.attrs.items()
             if k not in ("axes", "keep_aspect_ratio_policy")}
    if "extrapolation_value" in attrs:
        attrs["extrapolation_value"] = 0.0  # outputs outside the roi are constants: no gradient
    scale = np.array([1, 1, 1, scales[axis]], np.float32) if scales is not None else None
    if n.op == "Upsample" or b.opset < 11:
        m = run_node(n.op, [basis, scale], attrs, b.opset)[0]
    else:
        box = roi[axis] if roi is not None else (0.0, 1.0)
        rois = np.array([0, 0, 0, box[0], 1, 1, 1, box[1]], np.float32)
        size = None if sizes is None else np.array([1, size_in, 1, size_out], np.int64)
        if size is not None and b.opset < 13:
            scale = np.zeros(0, np.float32)  # Resize-11 wants an empty scales input next to sizes
        m = run_node("Resize", [basis, rois, scale, size], attrs, b.opset)[0]
    if m.shape != (1, size_in, 1, size_out):
        raise b.error(f"measured a resize of axis {axis} to {m.shape[-1]} elements, the model says {size_out}")
    return m.reshape(size_in, size_out)
