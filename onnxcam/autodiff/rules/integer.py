"""ConvInteger and MatMulInteger: the integer kernels of onnxruntime's dynamic quantization (quantize_dynamic), which
writes DynamicQuantizeLinear -> ConvInteger/MatMulInteger -> Cast -> Mul(x_scale * w_scale) in place of Conv/MatMul.

Each is its float twin on the zero-point-shifted integers, y = f(a - a_zp, b - b_zp), exact in int32; so its rule is
the float op's rule fed the shifted operands as floats, in the convention of qlinear.py (a gradient of an integer
tensor is with respect to its raw value). The scales enter through the Mul after the Cast, and
DynamicQuantizeLinear's rule (quantize.py) divides its own back out: the chain is the float model's gradient.
"""

from __future__ import annotations

from . import find_rule, rule
from .qlinear import _along, _input, _Stand


def _shifted(b, q, zero_point, axis: int):
    """q - zero_point as a float tensor of the gradient graph, with q's static shape."""
    x = b.cast(q, b.dtype)
    if zero_point is not None:
        x = b.op("Sub", x, b.cast(_along(b, zero_point, q, axis), b.dtype))
    x.shape, x.dtype = b.shape(q), b.dtype
    return x


def _integer_rule(float_op: str, axes: tuple):
    """axes: the axis a 1-D zero point runs along, for operand a and for operand b."""
    def grad_rule(b, n, gy):
        inner = find_rule(float_op, b.opset)
        if inner is None:
            raise b.error(f"needs the gradient rule of {float_op}, which is missing at opset {b.opset}")
        operands = [_shifted(b, n.inputs[k], _input(n, k + 2), axes[k]) for k in (0, 1)]
        stand = _Stand(float_op, n.name, operands, [n.outputs[0]], dict(n.attrs))
        makers = list(inner.fn(b, stand, gy))[:2]
        return makers + [None] * (len(n.inputs) - 2)
    return grad_rule


# ConvInteger(x, w, x_zero_point, w_zero_point): w's zero point per output channel (axis 0)
rule("ConvInteger")(_integer_rule("Conv", (1, 0)))
# MatMulInteger(A, B, a_zero_point, b_zero_point): per-row A (axis -2), per-column B (axis -1)
rule("MatMulInteger")(_integer_rule("MatMul", (-2, -1)))
