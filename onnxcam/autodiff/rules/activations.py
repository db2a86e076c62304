"""Activation functions. Rules prefer the forward output (y) to the input where the formula allows, so
onnxruntime can still fuse Conv+activation in the forward graph.

Masks are applied as g * Cast(condition) rather than Where(condition, g, 0): onnxruntime's Mul and Cast are
vectorised and its Where is not (2x faster at batch 8, tools/bench.py's middle stage).

Guided backpropagation (b.guided): every Relu-like rule also zeroes negative incoming gradients.
"""

from __future__ import annotations

import math

from . import rule


def _guide(b, g):
    """In guided mode keep only positive incoming gradients (Springenberg et al.; Grad-CAM's Guided Backprop)."""
    return b.op("Relu", g) if b.guided else g


@rule("Relu")
def _relu(b, n, gy):
    y = n.outputs[0]
    return (lambda: _masked(b, _guide(b, gy[0]), b.op("Greater", y, 0.0)),)


def _masked(b, g, keep):
    """g where keep, else 0."""
    return b.op("Mul", g, b.mask(keep))


@rule("LeakyRelu")
def _leaky_relu(b, n, gy):
    x = n.inputs[0]
    alpha = float(n.attrs.get("alpha", 0.01))
    return (lambda: b.op("Where", b.op("Greater", x, 0.0), _guide(b, gy[0]), b.op("Mul", _guide(b, gy[0]), alpha)),)


@rule("PRelu", broadcast=True)
def _prelu(b, n, gy):
    x, slope = n.inputs
    positive = b.op("Greater", x, 0.0)
    return (lambda: b.op("Where", positive, _guide(b, gy[0]), b.op("Mul", _guide(b, gy[0]), slope)),
            lambda: b.op("Where", positive, 0.0, b.op("Mul", gy[0], x)))


@rule("Elu")
def _elu(b, n, gy):
    x, y = n.inputs[0], n.outputs[0]
    alpha = float(n.attrs.get("alpha", 1.0))
    return (lambda: b.op("Where", b.op("Greater", x, 0.0), _guide(b, gy[0]),
                         b.op("Mul", _guide(b, gy[0]), b.op("Add", y, alpha))),)


@rule("Selu")
def _selu(b, n, gy):
    x, y = n.inputs[0], n.outputs[0]
    alpha = float(n.attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(n.attrs.get("gamma", 1.05070102214813232421875))
    return (lambda: b.op("Where", b.op("Greater", x, 0.0), b.op("Mul", _guide(b, gy[0]), gamma),
                         b.op("Mul", _guide(b, gy[0]), b.op("Add", y, alpha * gamma))),)


@rule("Clip")
def _clip(b, n, gy):
    """Gradient 1 where lo < x < hi, for the attribute (<11) and input forms.

    Read from the output: lo < y < hi holds exactly where lo < x < hi, and reading y keeps onnxruntime's
    Conv+Clip fusion. At the bounds themselves this takes the subgradient 0, as torch's relu6/hardtanh does
    (torch.clamp takes 1 there; both are valid, and the bounds are hit with probability 0 by a float pre-activation).
    """
    y = n.outputs[0]
    if b.opset < 11:
        lo, hi = n.attrs.get("min"), n.attrs.get("max")
    else:
        lo = n.inputs[1] if len(n.inputs) > 1 and n.inputs[1].name else None
        hi = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2].name else None

    def grad():
        keep = None
        if lo is not None:
            keep = b.op("Greater", y, lo)
        if hi is not None:
            below = b.op("Less", y, hi)
            keep = below if keep is None else b.op("And", keep, below)
        g = _guide(b, gy[0])
        return g if keep is None else _masked(b, g, keep)
    return (grad, None, None)


@rule("Sigmoid")
def _sigmoid(b, n, gy):
    y = n.outputs[0]
    return (lambda: b.op("Mul", gy[0], b.op("Mul", y, b.op("Sub", 1.0, y))),)


@rule("HardSigmoid")
def _hard_sigmoid(b, n, gy):
    x = n.inputs[0]
    alpha, beta = float(n.attrs.get("alpha", 0.2)), float(n.attrs.get("beta", 0.5))

    def grad():
        t = b.op("Add", b.op("Mul", x, alpha), beta)
        inside = b.op("And", b.op("Greater", t, 0.0), b.op("Less", t, 1.0))
        return b.op("Where", inside, b.op("Mul", gy[0], alpha), 0.0)
    return (grad,)


@rule("HardSwish", opsets=(14, 10_000))
def _hard_swish(b, n, gy):
    """y = x * clip(x/6 + 1/2, 0, 1): slope 0 below -3, 1 above 3, (2x + 3) / 6 between."""
    x = n.inputs[0]

    def grad():
        mid = b.op("Add", b.op("Mul", x, 1.0 / 3.0), 0.5)
        slope = b.op("Where", b.op("Less", x, -3.0), 0.0, b.op("Where", b.op("Greater", x, 3.0), 1.0, mid))
        return b.op("Mul", _guide(b, gy[0]), slope)
    return (grad,)


@rule("Tanh")
def _tanh(b, n, gy):
    y = n.outputs[0]
    return (lambda: b.op("Mul", gy[0], b.op("Sub", 1.0, b.op("Mul", y, y))),)


@rule("Erf")
def _erf(b, n, gy):
    x = n.inputs[0]
    return (lambda: b.op("Mul", gy[0], b.op("Mul", 2.0 / math.sqrt(math.pi), b.op("Exp", b.op("Mul", x, b.op("Neg", x))))),)


@rule("Softplus")
def _softplus(b, n, gy):
    return (lambda: b.op("Mul", gy[0], b.op("Sigmoid", n.inputs[0])),)


@rule("Softsign")
def _softsign(b, n, gy):
    x = n.inputs[0]
    return (lambda: b.op("Div", gy[0], b.op("Pow", b.op("Add", b.op("Abs", x), 1.0), 2.0)),)


@rule("Mish", opsets=(18, 10_000))
def _mish(b, n, gy):
    """y = x tanh(softplus(x)); y' = tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2)."""
    x = n.inputs[0]

    def grad():
        t = b.op("Tanh", b.op("Softplus", x))
        rest = b.op("Mul", b.op("Mul", x, b.op("Sigmoid", x)), b.op("Sub", 1.0, b.op("Mul", t, t)))
        return b.op("Mul", gy[0], b.op("Add", t, rest))
    return (grad,)


@rule("Gelu", opsets=(20, 10_000))
def _gelu(b, n, gy):
    """Exact: Phi(x) + x phi(x). Tanh approximation: derivative of 0.5 x (1 + tanh(k (x + 0.044715 x^3)))."""
    x = n.inputs[0]
    approximate = n.attrs.get("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate

    def exact():
        cdf = b.op("Mul", 0.5, b.op("Add", 1.0, b.op("Erf", b.op("Mul", x, 1.0 / math.sqrt(2.0)))))
        pdf = b.op("Mul", 1.0 / math.sqrt(2.0 * math.pi), b.op("Exp", b.op("Mul", b.op("Mul", x, x), -0.5)))
        return b.op("Mul", gy[0], b.op("Add", cdf, b.op("Mul", x, pdf)))

    def tanh_approx():
        k = math.sqrt(2.0 / math.pi)
        x2 = b.op("Mul", x, x)
        inner = b.op("Mul", k, b.op("Add", x, b.op("Mul", 0.044715, b.op("Mul", x2, x))))
        t = b.op("Tanh", inner)
        d_inner = b.op("Mul", k, b.op("Add", 1.0, b.op("Mul", 3 * 0.044715, x2)))
        sech2 = b.op("Sub", 1.0, b.op("Mul", t, t))
        d_outer = b.op("Mul", b.op("Mul", 0.5, x), b.op("Mul", sech2, d_inner))
        d = b.op("Add", b.op("Mul", 0.5, b.op("Add", 1.0, t)), d_outer)
        return b.op("Mul", gy[0], d)
    return (tanh_approx if approximate == "tanh" else exact,)


def _softmax_axis(b, n, default_old: int = 1):
    rank = len(b.shape(n.inputs[0]))
    axis = int(n.attrs.get("axis", default_old if b.opset < 13 else -1))
    return axis % rank, rank


def _flat2d(b, n, t):
    """Opset < 13 Softmax works on the input coerced to 2-D at `axis`: do the same for the gradient."""
    axis, _ = _softmax_axis(b, n)
    return b.op("Flatten", t, axis=axis)


@rule("Softmax")
def _softmax(b, n, gy):
    """dx = y * (gy - sum(gy * y)) over the softmax axis (or the flattened trailing dims before opset 13)."""
    x, y = n.inputs[0], n.outputs[0]

    def grad():
        if b.opset < 13:
            g2, y2 = _flat2d(b, n, gy[0]), _flat2d(b, n, y)
            s = b.reduce("ReduceSum", b.op("Mul", g2, y2), [1])
            return b.reshape_like(b.op("Mul", y2, b.op("Sub", g2, s)), x)
        axis, _ = _softmax_axis(b, n)
        s = b.reduce("ReduceSum", b.op("Mul", gy[0], y), [axis])
        return b.op("Mul", y, b.op("Sub", gy[0], s))
    return (grad,)


@rule("LogSoftmax")
def _log_softmax(b, n, gy):
    """dx = gy - exp(y) * sum(gy)."""
    x, y = n.inputs[0], n.outputs[0]

    def grad():
        if b.opset < 13:
            g2, y2 = _flat2d(b, n, gy[0]), _flat2d(b, n, y)
            s = b.reduce("ReduceSum", g2, [1])
            return b.reshape_like(b.op("Sub", g2, b.op("Mul", b.op("Exp", y2), s)), x)
        axis, _ = _softmax_axis(b, n)
        s = b.reduce("ReduceSum", gy[0], [axis])
        return b.op("Sub", gy[0], b.op("Mul", b.op("Exp", y), s))
    return (grad,)
