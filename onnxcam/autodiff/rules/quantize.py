"""QuantizeLinear / DequantizeLinear: the straight-through estimator, so a QDQ pair passes gradients unchanged.

Rounding and saturation have zero or no derivative; the straight-through estimator treats q = x / scale + zp as
if it were not rounded: dq/dx = 1 / scale and d(DQ)/dq = scale. The gradient of the integer tensor q is a float
tensor in "quantized units". Scales and zero points get no gradient.
"""

from __future__ import annotations

import numpy as np

from . import rule


def _scale(b, n):
    """The scale, shaped to broadcast against the input: a scalar (per tensor), or a 1-D scale along `axis`."""
    x, scale = n.inputs[:2]
    if int(n.attrs.get("block_size", 0)):
        raise b.error("uses blocked quantization (block_size > 0), which is not supported")
    rank, scale_rank = len(b.shape(x)), len(b.shape(scale))
    if scale_rank == 0 or rank <= 1:
        return scale
    if scale_rank != 1:
        raise b.error(f"has a scale of rank {scale_rank}; only per-tensor and per-axis (1-D) scales are supported")
    axis = int(n.attrs.get("axis", 1)) % rank
    return b.unsqueeze(scale, [a for a in range(rank) if a != axis])


@rule("QuantizeLinear")
def _quantize(b, n, gy):
    """Straight through (1 / scale); with a per-tensor scale also 0 where a folded Relu/ReLU6 range clamps, as
    for the QOperator kernels (qlinear._unquantize_gradient explains why the maps need it)."""
    from .qlinear import _unquantize_gradient

    scale = n.inputs[1]
    value = b.model.value(scale)
    if value is not None and np.size(value) == 1:
        return (lambda: _unquantize_gradient(b, n, gy[0], 1, 2), None, None)
    return (lambda: b.op("Div", gy[0], _scale(b, n)), None, None)


@rule("DequantizeLinear")
def _dequantize(b, n, gy):
    return (lambda: b.op("Mul", gy[0], _scale(b, n)), None, None)


@rule("DynamicQuantizeLinear")
def _dynamic_quantize(b, n, gy):
    """y = round(x / y_scale) + y_zero_point with the scale and zero point computed from x's range (always holding
    0, so nothing saturates): straight through, 1 / y_scale. As with QuantizeLinear, the scale and zero point count
    as constants (graph/model.py keeps them off the gradient path). An all-zero x has scale 0: gradient 0."""
    tiny = float(np.finfo(np.float32).tiny)
    return (lambda: b.op("Div", gy[0], b.op("Max", n.outputs[1], tiny)),)
