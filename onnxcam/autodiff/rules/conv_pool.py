"""Convolutions and pooling. The input gradient of a convolution is a ConvTranspose with the same weights (and the
other way round); pooling gradients reuse that transposition: AveragePool with a ones kernel, MaxPool either by
scattering to each window's first maximum, recomputed from the input (opset 16+), or, before ScatterElements
could add, by one-hot kernels that put each window tap's share back in place. (passes.pool_indices reads the
maxima's positions from the forward node's Indices output instead.) All need static spatial sizes.

Pool output sizes are measured by running the op itself at build time: onnx's shape inference and the runtimes
disagree on ceil_mode windows that would start in the end padding, and the gradient must follow the runtime.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ...graph.evaluate import node_attrs, run_node
from . import rule


def _auto_pad(n) -> str:
    auto = n.attrs.get("auto_pad", "NOTSET")
    return auto.decode() if isinstance(auto, bytes) else auto


def _geometry(b, n, in_sz, out_sz, kernel):
    """strides, dilations and begin pads of a Conv or pool, with auto_pad resolved from the static sizes."""
    nd = len(kernel)
    strides = [int(s) for s in n.attrs.get("strides", [1] * nd)]
    dilations = [int(d) for d in n.attrs.get("dilations", [1] * nd)]
    auto = _auto_pad(n)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        # The padding that makes out = ceil(in / stride); SAME_UPPER puts the odd one at the end.
        total = [max((out_sz[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_sz[i], 0)
                 for i in range(nd)]
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
    elif auto == "VALID":
        begin = [0] * nd
    else:
        begin = [int(p) for p in n.attrs.get("pads", [0] * (2 * nd))[:nd]]
    return strides, dilations, begin


def transposed_conv(b, g, weight, *, group, strides, dilations, begin, in_sz, out_sz, kernel):
    """The adjoint of a convolution with these parameters, applied to g: an input-shaped gradient.

    ConvTranspose scatters every output position back over its window (its full size is
    (out - 1) * stride + (k - 1) * dilation + 1); input position i sits at full position i + begin pad. With
    symmetric pads and a small remainder ConvTranspose's own pads/output_padding do the crop; otherwise crop with
    Slice and fill the input's uncovered tail with Pad (asymmetric ConvTranspose pads are unreliable in onnxruntime).
    """
    nd = len(kernel)
    weight, kernel, begin = _live_taps(b, weight, strides, dilations, begin, in_sz, out_sz, kernel)
    if all(s == 1 for s in strides) and b.opset >= 10:
        flipped = _as_stride1_conv(b, g, weight, group, dilations, begin, in_sz, out_sz, kernel)
        if flipped is not None:
            return flipped
    full = [(out_sz[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(nd)]
    extra = [in_sz[i] + 2 * begin[i] - full[i] for i in range(nd)]
    if all(0 <= extra[i] < strides[i] for i in range(nd)):
        return b.op("ConvTranspose", g, weight, group=group, strides=strides, dilations=dilations,
                    pads=list(begin) * 2, output_padding=extra if any(extra) else None)
    g = b.op("ConvTranspose", g, weight, group=group, strides=strides, dilations=dilations)
    stop = [min(full[i], begin[i] + in_sz[i]) for i in range(nd)]
    g = b.slice(g, begin, stop, list(range(2, 2 + nd)))
    tail = [begin[i] + in_sz[i] - stop[i] for i in range(nd)]
    if any(tail):
        g = b.pad(g, [0, 0] + [0] * nd + [0, 0] + tail)
    return g


def _live_taps(b, weight, strides, dilations, begin, in_sz, out_sz, kernel):
    """(weight, kernel, begin) of the same convolution without the taps that read padding at every output.

    A dilated convolution on a map smaller than its dilation (DeepLab's ASPP: rates 24 and 36 on a 20x20 map)
    has taps that never land inside the input: they multiply zeros, and their part of the gradient is zero. The
    kernel cut to the taps that do (a contiguous range per axis), with the begin pad moved by the taps cut before
    it, computes the same outputs; its adjoint reads 1/9 of the weights of a 3x3 left with its centre tap.
    Unchanged where every tap is live, the cut would leave a negative pad, or the weight's channels are unknown."""
    nd = len(kernel)
    live = []
    for i in range(nd):
        first_read = [t * dilations[i] - begin[i] for t in range(kernel[i])]  # input position read at output 0
        last_read = [p + (out_sz[i] - 1) * strides[i] for p in first_read]
        taps = [t for t in range(kernel[i]) if first_read[t] < in_sz[i] and last_read[t] >= 0]
        if not taps:
            return weight, kernel, begin
        live.append((taps[0], taps[-1] + 1))
    if all(lo == 0 and hi == k for (lo, hi), k in zip(live, kernel)):
        return weight, kernel, begin
    new_begin = [begin[i] - live[i][0] * dilations[i] for i in range(nd)]
    span = [(live[i][1] - live[i][0] - 1) * dilations[i] for i in range(nd)]
    new_end = [(out_sz[i] - 1) * strides[i] + span[i] + 1 - in_sz[i] - new_begin[i] for i in range(nd)]
    shape = b.model.shape(weight)
    if min(new_begin + new_end) < 0 or shape is None or not all(isinstance(d, int) for d in shape[:2]):
        return weight, kernel, begin
    kernel = [hi - lo for lo, hi in live]
    cut = b.slice(weight, [lo for lo, _ in live], [hi for _, hi in live], list(range(2, 2 + nd)))
    cut.shape, cut.dtype = list(shape[:2]) + kernel, weight.dtype  # for the adjoint's sizes
    return cut, kernel, new_begin


def _as_stride1_conv(b, g, weight, group, dilations, begin, in_sz, out_sz, kernel):
    """With stride 1 the adjoint of a convolution is itself a convolution: same dilations, the kernel flipped in
    space with its in/out channels swapped (per group), begin/end pads (k-1)d - pad. onnxruntime's Conv kernels
    (NCHWc, depthwise) are several times faster than its ConvTranspose, and the weight transform is folded once
    at session start. None when a pad exceeds (k-1)d (the window never fully inside): then ConvTranspose."""
    nd = len(kernel)
    span = [(kernel[i] - 1) * dilations[i] for i in range(nd)]
    end = [out_sz[i] - in_sz[i] - begin[i] + span[i] for i in range(nd)]  # the forward's effective end pad
    new_begin = [span[i] - begin[i] for i in range(nd)]
    new_end = [span[i] - end[i] for i in range(nd)]
    if min(new_begin + new_end) < 0:
        return None
    out_ch, in_per_group = b.static_dims(weight, [0, 1])
    w = weight
    if group == 1:
        w = b.op("Transpose", w, perm=[1, 0] + list(range(2, 2 + nd)))
    else:  # (g * M/g, C/g, k) -> (g * C/g, M/g, k)
        w = b.op("Reshape", w, b.ints([group, out_ch // group, in_per_group] + list(kernel)))
        w = b.op("Transpose", w, perm=[0, 2, 1] + list(range(3, 3 + nd)))
        w = b.op("Reshape", w, b.ints([group * in_per_group, out_ch // group] + list(kernel)))
    if any(k > 1 for k in kernel):
        w = b.slice(w, [-1] * nd, [-(2 ** 62)] * nd, list(range(2, 2 + nd)), [-1] * nd)
    return b.op("Conv", g, w, group=group, dilations=list(dilations), pads=new_begin + new_end)


def _spatial(b, t, nd):
    return b.static_dims(t, range(2, 2 + nd))


@rule("Conv")
def _conv(b, n, gy):
    x, w = n.inputs[0], n.inputs[1]
    kernel = [int(k) for k in n.attrs.get("kernel_shape", b.static_dims(w)[2:])]
    in_sz, out_sz = _spatial(b, x, len(kernel)), _spatial(b, n.outputs[0], len(kernel))
    strides, dilations, begin = _geometry(b, n, in_sz, out_sz, kernel)

    def d_x():
        return transposed_conv(b, gy[0], w, group=int(n.attrs.get("group", 1)), strides=strides,
                               dilations=dilations, begin=begin, in_sz=in_sz, out_sz=out_sz, kernel=kernel)
    return (d_x, None, None)


@rule("ConvTranspose")
def _conv_transpose(b, n, gy):
    """The adjoint of ConvTranspose is a Conv with the same weights over gy padded back to the full size.

    The full (uncropped) output is (in - 1) * stride + (k - 1) * dilation + 1 + output_padding long; the output
    is the window of it that starts at the begin pad. With output_shape or SAME padding the runtime derives the
    pads from the total crop, the odd one at the begin except for SAME_UPPER (the spec's rule, which onnxruntime
    follows).
    """
    x, w, y = n.inputs[0], n.inputs[1], n.outputs[0]
    kernel = [int(k) for k in n.attrs.get("kernel_shape", b.static_dims(w)[2:])]
    nd = len(kernel)
    strides = [int(s) for s in n.attrs.get("strides", [1] * nd)]
    dilations = [int(d) for d in n.attrs.get("dilations", [1] * nd)]
    out_pad = [int(p) for p in n.attrs.get("output_padding", [0] * nd)]
    in_sz, out_sz = _spatial(b, x, nd), _spatial(b, y, nd)
    full = [(in_sz[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + out_pad[i] for i in range(nd)]
    total = [full[i] - out_sz[i] for i in range(nd)]
    auto = _auto_pad(n)
    if auto == "SAME_UPPER":
        begin = [t // 2 for t in total]
    elif auto == "SAME_LOWER" or "output_shape" in n.attrs:
        begin = [t - t // 2 for t in total]
    elif auto == "VALID":
        begin = [0] * nd
    else:
        begin = [int(p) for p in n.attrs.get("pads", [0] * (2 * nd))[:nd]]
    end = [total[i] - begin[i] for i in range(nd)]

    def d_x():
        if any(p < 0 for p in begin + end):
            raise b.error(f"has an output larger than its full size (pads {begin + end}); not supported")
        if any(out_pad[i] >= strides[i] for i in range(nd)):
            raise b.error(f"has output_padding {out_pad} not below its strides {strides}; not supported")
        # Conv output size: floor((full - ((k-1)d + 1)) / s) + 1 = in, because output_padding < stride.
        return b.op("Conv", gy[0], w, group=int(n.attrs.get("group", 1)), strides=strides, dilations=dilations,
                    pads=begin + end)
    return (d_x, None, None)


@rule("GlobalAveragePool")
def _global_average_pool(b, n, gy):
    x = n.inputs[0]
    spatial = b.static_dims(x, range(2, len(b.shape(x))))
    # One broadcasting Mul by a constant 1/area map: onnxruntime's Expand is several times slower than Mul.
    share = np.full((1, 1, *spatial), 1.0 / int(np.prod(spatial)), b.dtype)
    return (lambda: b.op("Mul", gy[0], share),)


@rule("GlobalMaxPool")
def _global_max_pool(b, n, gy):
    """To the maximal element(s), split evenly on ties."""
    x, y = n.inputs[0], n.outputs[0]

    def grad():
        hit = b.mask(b.op("Not", b.op("Less", x, y)))  # x == max, written so: Equal takes no floats before opset 11
        ties = b.reduce("ReduceSum", hit, list(range(2, len(b.shape(x)))), keepdims=True)
        return b.op("Mul", hit, b.op("Div", gy[0], ties))
    return (grad,)


def _pool_out_size(b, n, in_sz) -> tuple:
    """The pool's output spatial size as the runtime computes it (see the module docstring)."""
    return tuple(run_node(n.op, [np.zeros((1, 1) + tuple(in_sz), np.float32)], node_attrs(n), b.opset)[0].shape[2:])


@dataclass(frozen=True)
class Windows:
    """A MaxPool's windows over its unpadded input plane, in the order the runtime scans them."""

    in_sz: tuple
    out_sz: tuple
    kernel: list
    strides: list
    dilations: list
    begin: list
    taps: np.ndarray  # [K, *out]: flat plane index of tap k of each window, -1 in the padding (_tap_positions)

    @property
    def plane(self) -> int:
        return int(np.prod(self.in_sz))


def pool_windows(b, n) -> Windows:
    """The windows of MaxPool node `n` (static spatial sizes; output size measured as the runtime has it)."""
    x = n.inputs[0]
    kernel = [int(k) for k in n.attrs["kernel_shape"]]
    in_sz = _spatial(b, x, len(kernel))
    out_sz = _pool_out_size(b, n, in_sz)
    strides, dilations, begin = _geometry(b, n, in_sz, out_sz, kernel)
    return Windows(in_sz, out_sz, kernel, strides, dilations, begin,
                   _tap_positions(in_sz, out_sz, kernel, strides, dilations, begin))


def _first_max_tap(b, n, w: Windows):
    """[N, C, *out] int64: the tap (0..K-1, in scan order) that holds each window's first maximum.

    The window's values are gathered tap by tap, padding taps set to -inf, and ArgMax takes the first of equal
    maxima: the element onnxruntime's MaxPool reports in its Indices output and torch sends the gradient to.
    """
    x = n.inputs[0]
    flat = b.op("Reshape", x, b.ints([0, 0, -1]))  # narrower floats are widened first: exactly
    taken = b.op("Gather", flat, b.ints(np.maximum(w.taps, 0)), axis=2)  # [N, C, K, *out]
    dtype = _float_type(x, b.dtype)
    if dtype is None:  # integer (quantized) MaxPools: compared as the real numbers they are
        taken, dtype = b.cast(taken, b.dtype), b.dtype
    outside = b.const(np.where(w.taps < 0, -np.inf, 0.0), dtype)
    return b.op("ArgMax", b.op("Add", taken, outside), axis=2, keepdims=0)


def _float_type(x, gradient_dtype: np.dtype) -> np.dtype | None:
    """The float type that x's values have in the gradient graph (narrower floats are widened to the gradient's
    type, float64 stays), or None for integer tensors."""
    try:
        dtype = np.dtype(x.dtype if x.dtype is not None else gradient_dtype)
    except TypeError:  # onnx-only types (bfloat16) arrive as TensorProto enums: widened
        return gradient_dtype
    if dtype.kind != "f":
        return None
    return dtype if dtype.itemsize > gradient_dtype.itemsize else gradient_dtype


def _first_max_plane_index(b, n, w: Windows):
    """[N, C, *out] int64: where each window's first maximum sits in its (unpadded, flattened) input plane.

    Tap t = (t_1..t_d) of the window at output position o is at o*stride - begin + t*dilation on each axis, so the
    flat index is a per-window base plus a per-tap offset; the maximum is never a padding tap.
    """
    nd = len(w.kernel)
    row = [int(np.prod(w.in_sz[i + 1:])) for i in range(nd)]  # flat stride of each spatial axis
    grid = np.meshgrid(*[np.arange(o) for o in w.out_sz], indexing="ij")
    base = sum((grid[i] * w.strides[i] - w.begin[i]) * row[i] for i in range(nd))
    offsets = [sum(t[i] * w.dilations[i] * row[i] for i in range(nd))
               for t in itertools.product(*[range(k) for k in w.kernel])]
    return b.op("Add", b.ints(np.asarray(base, np.int64)), b.op("Gather", b.ints(offsets), _first_max_tap(b, n, w)))


def _scatter_to_planes(b, x, where, gy):
    """Add gy [N, C, *out] into a zero tensor shaped like x at plane indices `where` [N, C, *out]."""
    planes = b.ints([0, 0, -1])
    zeros = b.op("Reshape", b.zeros_like(x), planes)
    g = b.op("ScatterElements", zeros, b.op("Reshape", where, planes), b.op("Reshape", gy, planes), axis=2,
             reduction="add")
    return b.reshape_like(g, x)


def taps_gradient(b, n, w: Windows, hit, gy):
    """gy sent back through the taps marked by `hit` [N, C, K, *out] (1 at the tap holding the window's maximum).

    Before opset 16 ScatterElements cannot add, and overlapping windows need adding. Instead the K masked copies
    of gy, stacked as channels, go back in place through one grouped ConvTranspose whose K kernels per channel are
    one-hot at their tap: the Conv gradient's transposition.
    """
    channels = b.static_dims(n.inputs[0], [1])[0]
    nd, k = len(w.kernel), len(w.taps)
    g = b.op("Mul", hit, b.unsqueeze(gy, [2]))
    g = b.op("Reshape", g, b.ints([0, channels * k] + list(w.out_sz)))
    one_hot = np.eye(k, dtype=b.dtype).reshape([k, 1] + w.kernel)
    weight = b.const(np.tile(one_hot, [channels, 1] + [1] * nd))  # [C*K, 1, *kernel], tap k of channel c
    return transposed_conv(b, g, weight, group=channels, strides=w.strides, dilations=w.dilations, begin=w.begin,
                           in_sz=w.in_sz, out_sz=w.out_sz, kernel=w.kernel)


@rule("MaxPool", opsets=(16, 10_000))
def _max_pool_scatter(b, n, gy):
    """Scatter-add gy to each window's first maximum, recomputed from the input (passes.pool_indices reads the
    forward node's Indices output instead where that is faster)."""
    def grad():
        w = pool_windows(b, n)
        return _scatter_to_planes(b, n.inputs[0], _first_max_plane_index(b, n, w), gy[0])
    return (grad,)


@rule("MaxPool", opsets=(8, 15))
def _max_pool_taps(b, n, gy):
    """Mask gy where each kernel tap holds its window's first maximum, and send the masks back (taps_gradient)."""
    def grad():
        w = pool_windows(b, n)
        tap = b.unsqueeze(_first_max_tap(b, n, w), [2])  # [N, C, 1, *out]
        hit = b.mask(b.op("Equal", tap, b.ints(np.arange(len(w.taps)).reshape([-1] + [1] * len(w.kernel)))))
        return taps_gradient(b, n, w, hit, gy[0])
    return (grad,)


def _tap_positions(in_sz, out_sz, kernel, strides, dilations, begin) -> np.ndarray:
    """taps[k, p] = flat index in the unpadded input plane of tap k of output window p, -1 in the padding."""
    grid = np.meshgrid(*[np.arange(o) for o in out_sz], indexing="ij")
    taps = []
    for tap in itertools.product(*[range(k) for k in kernel]):
        pos = [grid[i] * strides[i] - begin[i] + tap[i] * dilations[i] for i in range(len(kernel))]
        inside = np.logical_and.reduce([(p >= 0) & (p < s) for p, s in zip(pos, in_sz)])
        flat = np.ravel_multi_index([np.clip(p, 0, s - 1) for p, s in zip(pos, in_sz)], in_sz)
        taps.append(np.where(inside, flat, -1))
    return np.stack(taps).astype(np.int64)


@rule("AveragePool")
def _average_pool(b, n, gy):
    """y = S(x) * f, S the window sum over real (unpadded) elements and f = AveragePool(ones) / count(real).

    f is measured from the op itself at build time, so count_include_pad and ceil_mode follow the runtime
    exactly; the gradient is the transposed window sum of gy * f, a depthwise ConvTranspose with ones.
    """
    x = n.inputs[0]
    kernel = [int(k) for k in n.attrs["kernel_shape"]]
    in_sz = _spatial(b, x, len(kernel))
    channels = b.static_dims(x, [1])[0]

    def grad():
        averaged = run_node(n.op, [np.ones((1, 1) + tuple(in_sz), np.float32)], node_attrs(n), b.opset)[0]
        out_sz = averaged.shape[2:]
        strides, dilations, begin = _geometry(b, n, in_sz, out_sz, kernel)
        count = np.ones((1, 1) + tuple(out_sz), np.float64)
        for i in range(len(kernel)):
            o = np.arange(out_sz[i])[:, None] * strides[i] - begin[i] + np.arange(kernel[i])[None, :] * dilations[i]
            real = ((o >= 0) & (o < in_sz[i])).sum(axis=1).astype(np.float64)
            shape = [1] * (2 + len(kernel))
            shape[2 + i] = out_sz[i]
            count = count * real.reshape(shape)
        factor = np.where(count > 0, averaged / np.maximum(count, 1), 0.0)
        weight = b.const(np.ones((channels, 1) + tuple(kernel), b.dtype))
        return transposed_conv(b, b.op("Mul", gy[0], b.const(factor.astype(b.dtype))), weight, group=channels,
                               strides=strides, dilations=dilations, begin=begin, in_sz=in_sz, out_sz=out_sz,
                               kernel=kernel)
    return (grad,)
