"""Arithmetic with numpy broadcasting, and the pass-through ops. Gradients are output-shaped (broadcast=True)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from . import rule


@rule("Add", broadcast=True)
def _add(b, n, gy):
    return (lambda: gy[0], lambda: gy[0])


@rule("Sub", broadcast=True)
def _sub(b, n, gy):
    return (lambda: gy[0], lambda: b.op("Neg", gy[0]))


@rule("Mul", broadcast=True)
def _mul(b, n, gy):
    x, y = n.inputs
    return (lambda: b.op("Mul", gy[0], y), lambda: b.op("Mul", gy[0], x))


@rule("Div", broadcast=True)
def _div(b, n, gy):
    y, out = n.inputs[1], n.outputs[0]
    return (lambda: b.op("Div", gy[0], y),
            lambda: b.op("Neg", b.op("Div", b.op("Mul", gy[0], out), y)))  # -gy * x / y^2 = -gy * out / y


@rule("Pow", broadcast=True)
def _pow(b, n, gy):
    x, p = n.inputs
    out = n.outputs[0]

    def d_base():
        # p * x^(p-1), written as p * out / x would divide by zero at x = 0.
        p_f = p if p.dtype == b.dtype else b.cast(p, b.dtype)
        return b.op("Mul", gy[0], b.op("Mul", p_f, b.op("Pow", x, b.op("Sub", p_f, 1.0))))

    return (d_base, lambda: b.op("Mul", gy[0], b.op("Mul", out, b.op("Log", x))))


@rule("Sum", broadcast=True)
def _sum(b, n, gy):
    return [lambda: gy[0]] * len(n.inputs)


@rule("Mean", broadcast=True)
def _mean(b, n, gy):
    k = len(n.inputs)
    return [lambda: b.op("Mul", gy[0], 1.0 / k)] * k


@rule("Max", "Min", broadcast=True)
def _max_min(b, n, gy):
    """The gradient goes to the operand(s) equal to the result, split evenly on ties (as torch does).

    "Equal to the max" is written "not below the max": Equal takes floats only from opset 11."""
    out = n.outputs[0]
    below = "Less" if n.op == "Max" else "Greater"
    masks = [b.mask(b.op("Not", b.op(below, x, out))) for x in n.inputs]
    count = masks[0] if len(masks) == 1 else b.op("Sum", *masks)

    def share(m):
        return lambda: b.op("Div", b.op("Mul", gy[0], m), count)
    return [share(m) for m in masks]


@rule("Where", broadcast=True)
def _where(b, n, gy):
    cond = n.inputs[0]
    return (None,
            lambda: b.op("Where", cond, gy[0], 0.0),
            lambda: b.op("Where", cond, 0.0, gy[0]))


@rule("Neg")
def _neg(b, n, gy):
    return (lambda: b.op("Neg", gy[0]),)


@rule("Identity")
def _identity(b, n, gy):
    return (lambda: gy[0],)


@rule("Dropout")
def _dropout(b, n, gy):
    """Inference-mode Dropout is the identity. Training mode (is_test=0 before opset 7, a training_mode input set
    to true from opset 12) drops random elements, which an explanation must not do."""
    if b.opset < 7 and not int(n.attrs.get("is_test", 0)):
        raise b.error("is in training mode (is_test=0); only inference-mode Dropout is supported")
    if len(n.inputs) > 2 and n.inputs[2].name and bool(np.asarray(b.value(n.inputs[2], "training_mode"))):
        raise b.error("is in training mode; only inference-mode Dropout is supported")
    return (lambda: gy[0], None, None)


_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


@rule("Cast")
def _cast(b, n, gy):
    """Between float types the gradient passes, kept in the builder's dtype (see rules/__init__.py): a cast to
    another float type (float64, fp16) is undone on the gradient. To or from an integer type (rounding) there is
    no gradient."""
    x = n.inputs[0]
    to = int(n.attrs["to"])
    if x.dtype is not None and np.issubdtype(np.dtype(x.dtype), np.integer) and to in _FLOAT_TYPES:
        return (lambda: gy[0],)  # the walk reaches integers that stand for reals (ConvInteger's sums): exact
    if x.dtype is None or not np.issubdtype(np.dtype(x.dtype), np.floating):
        raise b.error(f"casts a non-float tensor {x.name!r} ({x.dtype}); it has no gradient")
    if to not in _FLOAT_TYPES:
        raise b.error(f"casts {x.name!r} to {TensorProto.DataType.Name(to)}; rounding to integers has no gradient")
    same = to == helper.np_dtype_to_tensor_dtype(b.dtype)
    return (lambda: gy[0] if same else b.cast(gy[0], b.dtype),)


@rule("Sqrt")
def _sqrt(b, n, gy):
    return (lambda: b.op("Div", b.op("Mul", gy[0], 0.5), n.outputs[0]),)


@rule("Reciprocal")
def _reciprocal(b, n, gy):
    y = n.outputs[0]
    return (lambda: b.op("Neg", b.op("Mul", gy[0], b.op("Mul", y, y))),)


@rule("Exp")
def _exp(b, n, gy):
    return (lambda: b.op("Mul", gy[0], n.outputs[0]),)


@rule("Log")
def _log(b, n, gy):
    return (lambda: b.op("Div", gy[0], n.inputs[0]),)


@rule("Abs")
def _abs(b, n, gy):
    return (lambda: b.op("Mul", gy[0], b.op("Sign", n.inputs[0])),)


@rule("Sign")
def _sign(b, n, gy):
    """Sign is piecewise constant: its derivative is zero wherever it exists, and taken as zero at 0 (as torch's).
    The zeros are written out because the walk wants a gradient from every reader of a tensor on the path; a second
    walk through Abs's or ReduceL1's gradient (ShapleyCAM) meets Sign there."""
    return (lambda: b.zeros_like(n.inputs[0]),)
