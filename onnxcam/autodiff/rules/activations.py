"""Activation functions. Rules prefer the forward output (y) to the input where the formula allows, so
onnxruntime can still fuse Conv+activation in the forward graph.

Masks are applied as g * Cast(condition) rather than Where(condition, g, 0): onnxruntime's Mul and Cast are
vectorised and its Where is not (2x faster at batch 8, tools/bench.py's middle stage).

Guided backpropagation (b.guided): every Relu-like rule also zeroes negative incoming gradients.
"""

from __future__ import annotations

import math

import numpy as np

from . import rule


def _guide(b, g):
    """In guided mode keep only positive incoming gradients (Springenberg et al.; Grad-CAM's Guided Backprop)."""
    return b.op("Relu", g) if b.guided else g


# ---- derivatives read from the output y = act(x), shared with the fused kernels (fused.py) -------------------
# Each takes the incoming gradient g, the output y and the activation's attributes (ONNX names, ONNX defaults),
# and returns g * act'(x). From y alone each is exact: y > 0 iff x > 0 for the Relu family, and the flat parts of
# HardSigmoid and Clip are where y sits on a bound.

def relu_grad(b, g, y, attrs):
    return _masked(b, _guide(b, g), b.op("Greater", y, 0.0))


def leaky_relu_grad(b, g, y, attrs):
    """Slope 1 where x > 0, alpha elsewhere: alpha + [x > 0] (1 - alpha). `y` may be x itself (any tensor with
    the sign of x); y has it only for alpha > 0."""
    alpha = float(attrs.get("alpha", 0.01))
    slope = b.op("Add", b.op("Mul", b.mask(b.op("Greater", y, 0.0)), 1.0 - alpha), alpha)
    return b.op("Mul", _guide(b, g), slope)


def elu_grad(b, g, y, attrs, gamma_default: float = 1.0, alpha_default: float = 1.0):
    """Elu and Selu (gamma = 1 for Elu): slope gamma where x > 0; y + gamma alpha where x <= 0 (then y <= 0),
    so slope = gamma alpha - relu(-y) + [y > 0] (gamma - gamma alpha)."""
    alpha = float(attrs.get("alpha", alpha_default))
    gamma = float(attrs.get("gamma", gamma_default))
    slope = b.op("Sub", gamma * alpha, b.op("Relu", b.op("Neg", y)))
    if gamma != gamma * alpha:
        slope = b.op("Add", slope, b.op("Mul", b.mask(b.op("Greater", y, 0.0)), gamma - gamma * alpha))
    return b.op("Mul", _guide(b, g), slope)


_SELU = (1.05070102214813232421875, 1.67326319217681884765625)  # ONNX's default gamma and alpha


def selu_grad(b, g, y, attrs):
    return elu_grad(b, g, y, attrs, *_SELU)


def sigmoid_grad(b, g, y, attrs):
    return b.op("Mul", g, b.op("Mul", y, b.op("Sub", 1.0, y)))


def tanh_grad(b, g, y, attrs):
    return b.op("Mul", g, b.op("Sub", 1.0, b.op("Mul", y, y)))


def hard_sigmoid_grad(b, g, y, attrs):
    """alpha where 0 < alpha x + beta < 1, i.e. where 0 < y < 1."""
    alpha = float(attrs.get("alpha", 0.2))
    inside = b.op("And", b.op("Greater", y, 0.0), b.op("Less", y, 1.0))
    return _masked(b, b.op("Mul", g, alpha), inside)


def softplus_grad(b, g, y, attrs):
    """y = log(1 + e^x): y' = sigmoid(x) = 1 - e^-y."""
    return b.op("Mul", g, b.op("Sub", 1.0, b.op("Exp", b.op("Neg", y))))


def softsign_grad(b, g, y, attrs):
    """y = x / (1 + |x|): y' = 1 / (1 + |x|)^2 = (1 - |y|)^2."""
    rest = b.op("Sub", 1.0, b.op("Abs", y))
    return b.op("Mul", g, b.op("Mul", rest, rest))


def clip_grad(b, g, y, lo, hi):
    """Gradient 1 where lo < y < hi (either bound may be None). At the bounds themselves this takes the
    subgradient 0, as torch's relu6/hardtanh does (torch.clamp takes 1 there; both are valid, and a float
    pre-activation hits the bounds with probability 0)."""
    keep = None
    if lo is not None:
        keep = b.op("Greater", y, lo)
    if hi is not None:
        below = b.op("Less", y, hi)
        keep = below if keep is None else b.op("And", keep, below)
    g = _guide(b, g)
    return g if keep is None else _masked(b, g, keep)


FROM_OUTPUT = {"Relu": relu_grad, "LeakyRelu": leaky_relu_grad, "Elu": elu_grad, "Selu": selu_grad,
               "Sigmoid": sigmoid_grad, "Tanh": tanh_grad, "HardSigmoid": hard_sigmoid_grad,
               "Softplus": softplus_grad, "Softsign": softsign_grad}


def _masked(b, g, keep):
    """g where keep, else 0."""
    return b.op("Mul", g, b.mask(keep))


def _output_rule(op: str):
    """Register FROM_OUTPUT[op] as the rule of `op`."""
    @rule(op)
    def grad_rule(b, n, gy):
        return (lambda: FROM_OUTPUT[op](b, gy[0], n.outputs[0], n.attrs),)
    grad_rule.__qualname__ = f"_{op.lower()}"
    return grad_rule


for _op in ("Relu", "Elu", "Selu", "Sigmoid", "Tanh", "HardSigmoid", "Softplus", "Softsign"):
    _output_rule(_op)


@rule("LeakyRelu")
def _leaky_relu(b, n, gy):
    """Read from y where y has the sign of x (alpha > 0), else from x."""
    sign = n.outputs[0] if float(n.attrs.get("alpha", 0.01)) > 0 else n.inputs[0]
    return (lambda: leaky_relu_grad(b, gy[0], sign, n.attrs),)


@rule("PRelu", broadcast=True)
def _prelu(b, n, gy):
    x, slope = n.inputs
    positive = b.op("Greater", x, 0.0)
    return (lambda: b.op("Where", positive, _guide(b, gy[0]), b.op("Mul", _guide(b, gy[0]), slope)),
            lambda: b.op("Where", positive, 0.0, b.op("Mul", gy[0], x)))


@rule("Clip")
def _clip(b, n, gy):
    """Gradient 1 where lo < x < hi, for the attribute (<11) and input forms; read from the output (lo < y < hi
    holds exactly where lo < x < hi), which keeps onnxruntime's Conv+Clip fusion."""
    y = n.outputs[0]
    if b.opset < 11:
        lo, hi = n.attrs.get("min"), n.attrs.get("max")
    else:
        lo = n.inputs[1] if len(n.inputs) > 1 and n.inputs[1].name else None
        hi = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2].name else None
    return (lambda: clip_grad(b, gy[0], y, lo, hi), None, None)


@rule("HardSwish", opsets=(14, 10_000))
def _hard_swish(b, n, gy):
    """y = x * clip(x/6 + 1/2, 0, 1): slope 0 below -3, 1 above 3, (2x + 3) / 6 between."""
    x = n.inputs[0]

    def grad():
        mid = b.op("Add", b.op("Mul", x, 1.0 / 3.0), 0.5)
        slope = b.op("Where", b.op("Less", x, -3.0), 0.0, b.op("Where", b.op("Greater", x, 3.0), 1.0, mid))
        return b.op("Mul", _guide(b, gy[0]), slope)  # passes.blocked_hard_swish may write the slope otherwise
    return (grad,)


_STEP = 2.0 ** 22  # (x - 3) * 2^22 is at least 1 for every float32 x above 3 (the spacing of floats near 3 is 2^-22)


def blocked_hard_swish_slope(b, x, c: int):
    """HardSwish's slope on a float32 (N, c, H, W) map x as three clipped depthwise 1x1 convolutions and their Sum,
    ops onnxruntime runs in its blocked layout: clip(x/3 + 1/2, -1/2, 3/2) (the slope between the kinks, its end
    values outside), plus 1/2 [x < -3] and minus 1/2 [x > 3]. The steps are exact for every float32:
    [x > 3] / 2 = -clip(3 * 2^22 - 2^22 x, -1/2, 0), 2^22 x being exact and the difference keeping its sign (exact
    near 3, where floats lie 2^-22 apart, so at least 1 in magnitude there); the sums of halves are exact. Torch's
    hardswish_backward puts -3 and 3 between the kinks: so do these (slope -1/2 and 3/2 there)."""

    def clipped(scale, shift, lo, hi):
        w, bias = np.full((c, 1, 1, 1), scale, np.float32), np.full(c, shift, np.float32)
        return b.clip(b.op("Conv", x, w, bias, group=c), lo, hi)
    between = clipped(1.0 / 3.0, 0.5, -0.5, 1.5)
    below = clipped(-_STEP, -3 * _STEP, 0.0, 0.5)  # 1/2 where x < -3
    above = clipped(-_STEP, 3 * _STEP, -0.5, 0.0)  # -1/2 where x > 3
    return b.op("Sum", between, below, above)


@rule("Erf")
def _erf(b, n, gy):
    x = n.inputs[0]
    return (lambda: b.op("Mul", gy[0], b.op("Mul", 2.0 / math.sqrt(math.pi), b.op("Exp", b.op("Mul", x, b.op("Neg", x))))),)


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
