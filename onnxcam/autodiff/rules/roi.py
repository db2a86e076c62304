"""RoiAlign (two-stage detectors: Faster R-CNN's box head reads its regions from the FPN maps).

For mode 'avg' RoiAlign is linear in X and separable per region r: Y[r, c] = Ay(r) @ X[b_r, c] @ Ax(r)^T, where
Ay(r) is (PH, H): row ph is the mean over the region's sampling rows y of the 1-D bilinear "tent" weights
relu(1 - |clamp(y, 0, H - 1) - h|), zero for a sample outside [-1, H] (and Ax likewise over W). That is exactly the
bilinear interpolation of ONNX's reference, onnxruntime and torchvision's roi_align, whose 2-D weights are products
of those 1-D ones and whose count (samples per bin, at least 1) is a product too. The gradient is the transpose:
dX[b] = sum_r [b_r == b] Ay(r)^T dY[r] Ax(r), built from Range, arithmetic, Relu/Abs and MatMul only.

The sampling grid: a fixed sampling_ratio s gives s samples per bin along each axis; sampling_ratio 0 gives each
region ceil(size / bins) of them, so the rows are laid out up to the largest count among the regions (computed at
run time) and the samples beyond a region's own count are masked out.
"""

from __future__ import annotations

import numpy as np

from . import rule
from .select import _int64


@rule("RoiAlign", opsets=(10, 10_000))
def _roi_align(b, n, gy):
    """Gradient to X only. The regions (rois) and their batch indices get none: they say where to read, chosen by
    data-dependent selections (the RPN's TopK and NMS), and detectors treat them as constants (torchvision,
    detectron2 and mmdet all detach their proposals before RoiAlign). The path search knows this too
    (graph/model.py, _differentiable_input), so the walk never asks for a gradient of the regions."""
    if n.attrs.get("mode", "avg") != "avg":
        raise b.error(f"has mode {n.attrs.get('mode')!r}; only mode 'avg' is differentiated (its max over samples "
                      "is no bilinear average)")
    if b.opset < 11:
        raise b.error("needs Range (opset 11+) to lay out its sampling grid; export the model at opset 11 or newer")
    x, rois = n.inputs[0], n.inputs[1]

    def grad():
        ay, ax = _axis_weights(b, n, rois, x, "y"), _axis_weights(b, n, rois, x, "x")  # (R, PH, H), (R, PW, W)
        # dY[r] (C, PH, PW) -> Ay^T dY[r]: (R, C, H, PW); the sum over regions and PW is then one MatMul per image
        rows = b.op("MatMul", b.op("Transpose", b.unsqueeze(ay, [1]), perm=[0, 1, 3, 2]), gy[0])
        xshape = b.shape_of(x)
        batch, channels, height, width = (b.slice(xshape, [k], [k + 1], [0]) for k in range(4))
        # -1, not R * PW: a level of a multi-scale RoiAlign may get no regions, and Reshape reads a 0 as "keep"
        rows = b.op("Reshape", b.op("Transpose", rows, perm=[1, 2, 0, 3]),  # (C * H, R * PW)
                    b.op("Concat", b.op("Mul", channels, height), b.ints([-1]), axis=0))
        owned = b.mask(b.op("Equal", b.unsqueeze(b.op("Range", b.ints(0), b.squeeze(batch, [0]), b.ints(1)), [1]),
                            b.unsqueeze(_int64(b, n.inputs[2]), [0])))  # (B, R): region r reads image b
        cols = b.op("Mul", b.unsqueeze(owned, [2, 3]), b.unsqueeze(ax, [0]))  # (B, R, PW, W)
        cols = b.op("Reshape", cols, b.op("Concat", batch, b.ints([-1]), width, axis=0))  # (B, R * PW, W)
        # one zero term more: with no regions the sum is empty, and onnxruntime's MatMul leaves an empty (K = 0)
        # product's output uninitialized instead of zero
        rows, cols = b.pad(rows, [0, 0, 0, 1]), b.pad(cols, [0, 0, 0, 0, 1, 0])
        return b.reshape_like(b.op("MatMul", rows, cols), x)  # (B, C * H, W) -> (B, C, H, W)
    return (grad, None, None)


def _axis_weights(b, n, rois, x, axis: str):
    """Ay (axis 'y': (R, PH, H)) or Ax ('x': (R, PW, W)): each output bin's mean of the 1-D tent weights of its
    sampling positions, in the order onnxruntime computes them (start + bin * ph + (i + 0.5) * bin / grid)."""
    half_pixel = _mode(b, n) == "half_pixel"
    pooled = int(n.attrs.get("output_height" if axis == "y" else "output_width", 1))
    ratio = int(n.attrs.get("sampling_ratio", 0))
    scale = float(n.attrs.get("spatial_scale", 1.0))
    lo_col, hi_col, dim = (1, 3, 2) if axis == "y" else (0, 2, 3)
    offset = 0.5 if half_pixel else 0.0
    start = b.op("Sub", b.op("Mul", b.slice(rois, [lo_col], [lo_col + 1], [1]), scale), offset)  # (R, 1)
    end = b.op("Sub", b.op("Mul", b.slice(rois, [hi_col], [hi_col + 1], [1]), scale), offset)
    size = b.op("Sub", end, start)
    if not half_pixel:  # the legacy (output_half_pixel) mode makes every region at least one pixel
        size = b.op("Max", size, 1.0)
    bin_size = b.op("Div", size, float(pooled))
    if ratio > 0:
        grid3 = b.const(np.full((1, 1, 1), ratio, b.dtype))
        samples = b.ints(ratio)
    else:  # adaptive: ceil(size / bins) samples per bin, a count per region (none for an empty or reversed one)
        grid3 = b.unsqueeze(b.op("Ceil", bin_size), [2])  # (R, 1, 1)
        most = b.reduce("ReduceMax", b.op("Concat", b.op("Max", grid3, 0.0), b.const(np.zeros((1, 1, 1), b.dtype)),
                                          axis=0), [0, 1, 2], keepdims=False)  # 0 with no regions at all
        samples = b.cast(most, np.int64)
    # positions (R, pooled, S): start + bin * ph + (i + 0.5) * bin / grid for sample i < S of bin ph
    i = b.cast(b.op("Range", b.ints(0), samples, b.ints(1)), b.dtype)  # (S,)
    ph = b.const(np.arange(pooled, dtype=b.dtype).reshape(1, pooled, 1))
    bin3 = b.unsqueeze(bin_size, [2])  # (R, 1, 1)
    pos = b.op("Add", b.op("Add", b.unsqueeze(start, [2]), b.op("Mul", ph, bin3)),
               b.op("Div", b.op("Mul", b.op("Add", i, 0.5), bin3), grid3))
    extent = b.cast(b.slice(b.shape_of(x), [dim], [dim + 1], [0]), b.dtype)  # (1,): H or W
    inside = b.op("And", b.op("GreaterOrEqual", pos, -1.0), b.op("LessOrEqual", pos, extent))
    if ratio <= 0:  # samples beyond this region's own count
        inside = b.op("And", inside, b.op("Less", i, grid3))
    clamped = b.op("Min", b.op("Max", pos, 0.0), b.op("Sub", extent, 1.0))
    pixels = b.cast(b.op("Range", b.ints(0), b.cast(b.squeeze(extent, [0]), np.int64), b.ints(1)), b.dtype)
    tent = b.op("Relu", b.op("Sub", 1.0, b.op("Abs", b.op("Sub", b.unsqueeze(clamped, [3]), pixels))))
    tent = b.op("Mul", tent, b.unsqueeze(b.mask(inside), [3]))  # (R, pooled, S, H)
    summed = b.reduce("ReduceSum", tent, [2], keepdims=False)  # (R, pooled, H)
    return b.op("Div", summed, b.op("Max", grid3, 1.0))


def _mode(b, n) -> str:
    """RoiAlign-16 added coordinate_transformation_mode (default half_pixel); RoiAlign-10 is output_half_pixel."""
    default = "half_pixel" if b.opset >= 16 else "output_half_pixel"
    mode = n.attrs.get("coordinate_transformation_mode", default)
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode not in ("half_pixel", "output_half_pixel"):
        raise b.error(f"has coordinate_transformation_mode {mode!r}; expected 'half_pixel' or 'output_half_pixel'")
    return mode
