"""Reductions: the gradient is gy broadcast back over the reduced axes (scaled for the mean, masked for max/min).

Every Reduce* op reads its axes from an attribute (ReduceSum before opset 13, the others before 18) or from an
optional second input (later); no axes means all axes, unless noop_with_empty_axes=1, where the op reduces
nothing and applies its per-element function (|x| for ReduceL1, x^2 for ReduceSumSquare, ...) instead, as both
onnxruntime and onnx's reference evaluator do. The formulas below, written with `y` broadcast back over the
reduced axes, hold in that case too.

ReduceProd has no rule: gy * y / x is wrong wherever x has zeros.
"""

from __future__ import annotations

import math

from . import rule


def _axes(b, n) -> list[int]:
    """The reduced axes, sorted and non-negative; [] when the node reduces nothing (noop_with_empty_axes=1)."""
    rank = len(b.shape(n.inputs[0]))
    if len(n.inputs) > 1 and n.inputs[1].name:
        axes = [int(a) for a in b.value(n.inputs[1], "axes").ravel()]
    else:
        axes = [int(a) for a in n.attrs.get("axes", [])]
    if not axes:
        return [] if int(n.attrs.get("noop_with_empty_axes", 0)) else list(range(rank))
    return sorted({a % rank for a in axes})


def _kept(b, n, t, axes):
    """`t` shaped like the output, with the reduced axes put back as size 1 when keepdims=0 removed them."""
    if int(n.attrs.get("keepdims", 1)) or not axes:
        return t
    return b.unsqueeze(t, axes)


def _sum_kept(b, t, axes):
    return b.reduce("ReduceSum", t, axes, keepdims=True) if axes else t


def _expand(b, g, x):
    return b.op("Expand", g, b.shape_of(x))


def _count(b, n, axes):
    """How many elements each output averages: static when the reduced dims are, else Size(x) / Size(y)."""
    shape = b.shape(n.inputs[0])
    dims = [shape[a] for a in axes]
    if all(isinstance(d, int) for d in dims):
        return float(math.prod(dims))
    size_x, size_y = (b.cast(b.op("Size", t), b.dtype) for t in (n.inputs[0], n.outputs[0]))
    return b.op("Div", size_x, size_y)


def _reduce_rule(*ops: str):
    """Register a reduction's formula as the rule of each op in `ops`.

    The formula is called as `formula(b, n, x, y, g, axes)` and returns dx, shaped like x: `n` is the forward
    node, `x` its input, `y` its output and `g` the incoming gradient, both with the reduced axes kept as size 1
    (so they broadcast against x), and `axes` the reduced axes, sorted and non-negative ([] when the node reduces
    nothing). The registered rule carries the formula's name, so an internal error names the formula.
    """
    def register(formula):
        def grad_rule(b, n, gy):
            x = n.inputs[0]

            def grad():
                axes = _axes(b, n)
                g, y = _kept(b, n, gy[0], axes), _kept(b, n, n.outputs[0], axes)
                return formula(b, n, x, y, g, axes)
            return (grad, None)
        grad_rule.__qualname__ = grad_rule.__name__ = formula.__name__
        grad_rule.__doc__ = formula.__doc__
        rule(*ops)(grad_rule)
        return formula
    return register


@_reduce_rule("ReduceSum")
def _reduce_sum(b, n, x, y, g, axes):
    return _expand(b, g, x)


@_reduce_rule("ReduceMean")
def _reduce_mean(b, n, x, y, g, axes):
    return _expand(b, b.op("Div", g, _count(b, n, axes)), x)


@_reduce_rule("ReduceMax", "ReduceMin")
def _reduce_max_min(b, n, x, y, g, axes):
    """Like torch.amax/amin: the gradient is split evenly between tied extrema (found as "not below the max":
    Equal takes floats only from opset 11)."""
    hit = b.mask(b.op("Not", b.op("Less" if n.op == "ReduceMax" else "Greater", x, y)))
    return b.op("Mul", hit, b.op("Div", g, _sum_kept(b, hit, axes)))


@_reduce_rule("ReduceL1")
def _reduce_l1(b, n, x, y, g, axes):
    return b.op("Mul", g, b.op("Sign", x))


@_reduce_rule("ReduceL2")
def _reduce_l2(b, n, x, y, g, axes):
    """d sqrt(sum x^2) = x / y; undefined (NaN) where the whole reduced slice is zero."""
    return b.op("Mul", g, b.op("Div", x, y))


@_reduce_rule("ReduceSumSquare")
def _reduce_sum_square(b, n, x, y, g, axes):
    return b.op("Mul", g, b.op("Mul", x, 2.0))


@_reduce_rule("ReduceLogSum")
def _reduce_log_sum(b, n, x, y, g, axes):
    """d log(sum x) = 1 / sum x = exp(-y)."""
    return _expand(b, b.op("Mul", g, b.op("Exp", b.op("Neg", y))), x)


@_reduce_rule("ReduceLogSumExp")
def _reduce_log_sum_exp(b, n, x, y, g, axes):
    """The softmax of x over the reduced axes: exp(x - y)."""
    return b.op("Mul", g, b.op("Exp", b.op("Sub", x, y)))
