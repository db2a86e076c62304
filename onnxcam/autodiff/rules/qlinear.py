"""QOperator kernels (QLinearConv, QLinearMatMul, com.microsoft QLinearAdd/Mul/Concat/..., QGemm), differentiated as
their dequantized float equivalents: y_q = Q(f(DQ(a_q), DQ(b_q), ...)) for the float op f.

The convention is quantize.py's: a gradient of an integer tensor is with respect to its raw integer value
(dDQ(a_q)/da_q = a_scale), and Q is the straight-through estimator (dQ(v)/dv = 1 / y_scale). One addition:
quantize_static folds a Relu or Clip(0, 6) into the output range of the op before it (its zero point at the
type's minimum), so there y_q at either end of its integer type is the activation's flat part, and gets gradient
0 as it has in the float model; without that, Grad-CAM at a middle layer of an int8 Lite0 is uncorrelated with
the fp32 map. (quantize.py's QuantizeLinear rule would need the same mask for QDQ builds to match.)

Each rule dequantizes its operands inside the gradient graph (Cast, Sub zero point, Mul scale: every opset,
per-tensor or per-axis; onnxruntime folds it for constant weights), hands them to the float op's own rule as a
stand-in node, and scales what comes back: one formula per op, kept with its float twin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import find_rule, rule

MS = "com.microsoft"


@dataclass
class _Stand:
    """A stand-in forward node for a float rule: the same fields the rules read (op, name, attrs, in/outputs)."""

    op: str
    name: str
    inputs: list
    outputs: list
    attrs: dict = field(default_factory=dict)
    domain: str = ""


def _input(n, i):
    """Input i of node n, or None when it is omitted."""
    return n.inputs[i] if i is not None and i < len(n.inputs) and n.inputs[i].name else None


def _along(b, param, like, axis: int):
    """A scale or zero point shaped to broadcast against `like`: a scalar as is, a 1-D tensor along `axis`."""
    if len(b.shape(param)) == 0:
        return param
    rank = len(b.shape(like))
    axis %= rank
    return b.unsqueeze(param, [a for a in range(rank) if a != axis])


def dequantized(b, q, scale, zero_point, axis: int = 1):
    """DQ(q) = (q - zero_point) * scale as a float tensor of the gradient graph, with q's static shape."""
    x = b.cast(q, b.dtype)
    if zero_point is not None:
        x = b.op("Sub", x, b.cast(_along(b, zero_point, q, axis), b.dtype))
    x = b.op("Mul", x, _along(b, scale, q, axis))
    x.shape, x.dtype = b.shape(q), b.dtype
    return x


def _int_range(b, y, zero_point) -> tuple[int, int]:
    """The ends of quantized tensor y's integer type: where it saturates."""
    dtype = y.dtype if y.dtype is not None else (b.value(zero_point, "zero point").dtype if zero_point is not None
                                                 else np.uint8)  # QuantizeLinear's default output type
    try:
        info = np.iinfo(np.dtype(dtype))
    except (TypeError, ValueError):
        raise b.error(f"has an output {y.name!r} of type {dtype}, not an integer type") from None
    return int(info.min), int(info.max)


def _unquantize_gradient(b, n, g, scale_idx, zp_idx):
    """d(float result) from d(y_q): straight through (1 / y_scale), and 0 where a folded activation clamped.

    A range that starts at zero (zero point at the type's minimum) is how quantize_static folds a Relu or
    Clip(0, 6) into the op before it: there y_q at either end of its type is the activation's flat part, and the
    float model's gradient is 0 too. Other ranges (logits, residual sums) saturate only where calibration saw
    no such values; their gradient passes straight through, as quantize.py's does.
    """
    y, scale, zp = n.outputs[0], _input(n, scale_idx), _input(n, zp_idx)
    lo, hi = _int_range(b, y, zp)
    zero = 0 if zp is None else b.value(zp, "zero point")
    if np.size(zero) != 1 or int(np.ravel(zero)[0]) != lo:
        return b.op("Div", g, scale)
    yf = b.cast(y, b.dtype)
    inside = b.op("And", b.op("Greater", yf, float(lo)), b.op("Less", yf, float(hi)))
    return b.op("Where", inside, b.op("Div", g, scale), 0.0)


@dataclass(frozen=True)
class _Spec:
    float_op: str
    operands: tuple        # per float input: (data, scale, zero point) input indices of the QOperator node
    output: tuple | None   # (scale, zero point) indices of the output's quantization; None for a float output
    axes: tuple = ()       # per operand, the axis a 1-D (per-channel) scale runs along; default 1
    drop_attrs: tuple = ()  # attributes the float op does not have

    def axis(self, k: int, n) -> int:
        return self.axes[k](n) if k < len(self.axes) and callable(self.axes[k]) else \
            (self.axes[k] if k < len(self.axes) else 1)


def _float_equivalent(spec: _Spec, output_op: str | None = None):
    """The rule of a QOperator op: its float twin's rule, fed dequantized operands and an unquantized gradient."""

    def grad_rule(b, n, gy):
        inner = find_rule(spec.float_op, b.opset)
        if inner is None:  # cannot happen for the ops listed here, but say so rather than fail obscurely
            raise b.error(f"needs the gradient rule of {spec.float_op}, which is missing at opset {b.opset}")
        operands = [dequantized(b, n.inputs[d], _input(n, s), _input(n, z), spec.axis(k, n))
                    for k, (d, s, z) in enumerate(spec.operands)]
        out = n.outputs[0]
        attrs = {k: v for k, v in n.attrs.items() if k not in spec.drop_attrs}
        if output_op is not None:  # float rules that read their output (Sigmoid, LeakyRelu) get the float result
            out = b.op(output_op, operands[0], **attrs)
            out.shape, out.dtype = b.shape(n.outputs[0]), b.dtype
        stand = _Stand(spec.float_op, n.name, operands, [out], attrs)
        g = gy[0] if spec.output is None else _unquantize_gradient(b, n, gy[0], *spec.output)
        makers = inner.fn(b, stand, [g])
        result = [None] * len(n.inputs)
        for k, (d, s, z) in enumerate(spec.operands):
            make = makers[k] if k < len(makers) else None
            if make is not None:
                result[d] = _scaled(b, n, make, inner.broadcast, d, _input(n, s), spec.axis(k, n))
        return result
    return grad_rule


def _scaled(b, n, make, broadcast: bool, data: int, scale, axis: int):
    """d(raw integer) = d(dequantized) * scale. A broadcast-shaped gradient (output-shaped for a broadcasting
    float op, or as the float rule declared it) stays so and is declared again: the walk sums it back to the
    operand's shape. The scale, shaped against the operand, broadcasts against it from the right."""
    def grad():
        g = make()
        shape = b.shape(n.outputs[0]) if broadcast else b.grad_shapes.get(g.name)
        scaled = b.op("Mul", g, _along(b, scale, n.inputs[data], axis))
        return scaled if shape is None else b.broadcast_shaped(scaled, shape)
    return grad


def _register(op: str, spec: _Spec, domain: str = "", output_op: str | None = None) -> None:
    rule(op, domain=domain)(_float_equivalent(spec, output_op))


def _channels_first_only(op: str, spec: _Spec, domain: str = MS):
    """com.microsoft pools with a channels_last attribute: the NCHW form only (onnxruntime's NHWC transformer
    writes channels_last=1 only into models saved at ORT_ENABLE_ALL, whose layout is hardware specific)."""
    inner = _float_equivalent(spec)

    @rule(op, domain=domain)
    def grad_rule(b, n, gy):
        if int(n.attrs.get("channels_last", 0)):
            raise b.error("has channels_last=1 (an NHWC kernel from onnxruntime's ORT_ENABLE_ALL layout "
                          "optimizations); save the model with ORT_ENABLE_EXTENDED or explain the original model")
        return inner(b, n, gy)
    return grad_rule


# QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B): w's scale runs along output channels (axis 0).
_register("QLinearConv", _Spec("Conv", ((0, 1, 2), (3, 4, 5)), (6, 7), axes=(1, 0)))
# QLinearMatMul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp): per-row a (axis -2), per-column b (axis -1).
_register("QLinearMatMul", _Spec("MatMul", ((0, 1, 2), (3, 4, 5)), (6, 7), axes=(-2, -1)))
# QLinearAdd / QLinearMul(A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp): per-tensor, broadcasting.
_register("QLinearAdd", _Spec("Add", ((0, 1, 2), (3, 4, 5)), (6, 7)), MS)
_register("QLinearMul", _Spec("Mul", ((0, 1, 2), (3, 4, 5)), (6, 7)), MS)
# QLinearSigmoid / QLinearLeakyRelu(X, X_scale, X_zp, Y_scale, Y_zp)
_register("QLinearSigmoid", _Spec("Sigmoid", ((0, 1, 2),), (3, 4)), MS, output_op="Sigmoid")
_register("QLinearLeakyRelu", _Spec("LeakyRelu", ((0, 1, 2),), (3, 4)), MS, output_op="LeakyRelu")
# QLinearAveragePool(X, x_scale, x_zp, y_scale, y_zp)
_channels_first_only("QLinearAveragePool", _Spec("AveragePool", ((0, 1, 2),), (3, 4), drop_attrs=("channels_last",)))


@rule("QLinearGlobalAveragePool", domain=MS)
def _qlinear_global_average_pool(b, n, gy):
    """Y = GAP(DQ(X)) over the spatial axes: 2.. (NCHW) or 1..-2 (channels_last); every input position gets the
    output's gradient / area. Y keeps size-1 spatial axes, so it expands back to X in either layout."""
    x = n.inputs[0]
    rank = len(b.shape(x))
    spatial = range(1, rank - 1) if int(n.attrs.get("channels_last", 0)) else range(2, rank)
    area = int(np.prod(b.static_dims(x, spatial)))

    def grad():
        g = _unquantize_gradient(b, n, gy[0], 3, 4)
        return b.op("Expand", b.op("Mul", g, b.op("Div", n.inputs[1], float(area))), b.shape_of(x))
    return (grad,)


# QGemm(A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp): Y = alpha A' B' + C, quantized if y_scale is given.
# b_scale per column of B' (the N axis): axis 1 of B, or axis 0 when transB.
_QGEMM = _Spec("Gemm", ((0, 1, 2), (3, 4, 5)), (7, 8), axes=(0, lambda n: 0 if int(n.attrs.get("transB", 0)) else 1))
_QGEMM_FLOAT = _Spec("Gemm", _QGEMM.operands, None, _QGEMM.axes)


@rule("QGemm", domain=MS)
def _qgemm(b, n, gy):
    return _float_equivalent(_QGEMM if _input(n, 7) is not None else _QGEMM_FLOAT)(b, n, gy)


@rule("QLinearConcat", domain=MS)
def _qlinear_concat(b, n, gy):
    """QLinearConcat(Y_scale, Y_zp, X1, X1_scale, X1_zp, X2, ...): the inputs come in triples after the output's."""
    triples = tuple((i, i + 1, i + 2) for i in range(2, len(n.inputs), 3))
    return _float_equivalent(_Spec("Concat", triples, (0, 1)))(b, n, gy)
