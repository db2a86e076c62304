"""Normalizations in inference form: BatchNormalization (running statistics), Instance- and LayerNormalization.

Instance- and LayerNormalization normalize with statistics of the input itself, so their input gradient has the
two extra terms of a normalization: dx = (g - mean(g) - xhat * mean(g * xhat)) / std over the normalized axes,
where g is the gradient reaching xhat = (x - mean) / std.
"""

from __future__ import annotations

import functools

from . import rule


def _per_channel(b, v, rank: int):
    """A (C,) tensor shaped (C, 1, 1, ...) to broadcast against (N, C, D1, ...)."""
    return b.unsqueeze(v, list(range(1, rank - 1))) if rank > 2 else v


def _sum_but_channel(b, t, rank: int):
    """Sum an (N, C, D1, ...) tensor down to (C,)."""
    return b.reduce("ReduceSum", t, [0] + list(range(2, rank)), keepdims=False)


def _only_output_0(b, n, gy, why: str):
    if any(g is not None for g in gy[1:]):
        raise b.error(f"has a gradient reaching an output other than Y; {why}")


def _standardize(b, x, axes, eps: float):
    """(xhat, 1/std) of x over `axes`, recomputed from x with keepdims."""
    mean = b.reduce("ReduceMean", x, axes)
    centered = b.op("Sub", x, mean)
    var = b.reduce("ReduceMean", b.op("Mul", centered, centered), axes)
    inv_std = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, eps)))
    return b.op("Mul", centered, inv_std), inv_std


def _standardized_grad(b, g, xhat, inv_std, axes):
    """The gradient w.r.t. x of <g, (x - mean(x)) / std(x)>."""
    mean_g = b.reduce("ReduceMean", g, axes)
    mean_gx = b.reduce("ReduceMean", b.op("Mul", g, xhat), axes)
    return b.op("Mul", inv_std, b.op("Sub", b.op("Sub", g, mean_g), b.op("Mul", xhat, mean_gx)))


@rule("BatchNormalization")
def _batch_norm(b, n, gy):
    """Inference BN is per-channel affine: y = scale * (x - mean) / sqrt(var + eps) + B (channels on axis 1)."""
    x, scale, _, mean, var = n.inputs[:5]
    if int(n.attrs.get("training_mode", 0)) or (b.opset < 7 and not int(n.attrs.get("is_test", 0))):
        raise b.error("is in training mode; only inference BatchNormalization is supported")
    if b.opset < 9 and not int(n.attrs.get("spatial", 1)):
        raise b.error("has spatial=0 (per-activation statistics), which is not supported")
    _only_output_0(b, n, gy, "only inference BatchNormalization is supported")
    eps = float(n.attrs.get("epsilon", 1e-5))
    rank = len(b.shape(x))
    g = gy[0]

    @functools.cache
    def inv_std():
        return b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, eps)))

    def factor():  # scale / sqrt(var + eps), per channel
        return b.op("Mul", scale, inv_std())

    def centered():
        return b.op("Sub", x, _per_channel(b, mean, rank))

    def d_var():  # d/dvar (var + eps)^(-1/2) = -1/2 inv_std^3
        inv_std3 = b.op("Mul", inv_std(), b.op("Mul", inv_std(), inv_std()))
        return b.op("Mul", _sum_but_channel(b, b.op("Mul", g, centered()), rank),
                    b.op("Mul", scale, b.op("Mul", inv_std3, -0.5)))

    return (lambda: b.op("Mul", g, _per_channel(b, factor(), rank)),
            lambda: b.op("Mul", _sum_but_channel(b, b.op("Mul", g, centered()), rank), inv_std()),
            lambda: _sum_but_channel(b, g, rank),
            lambda: b.op("Neg", b.op("Mul", _sum_but_channel(b, g, rank), factor())),
            d_var)


@rule("InstanceNormalization")
def _instance_norm(b, n, gy):
    """y = scale * xhat + B, xhat standardized over the spatial axes of each sample and channel."""
    x, scale = n.inputs[:2]
    eps = float(n.attrs.get("epsilon", 1e-5))
    rank = len(b.shape(x))
    axes = list(range(2, rank))
    g = gy[0]
    stats = functools.cache(lambda: _standardize(b, x, axes, eps))

    def d_x():
        xhat, inv_std = stats()
        return _standardized_grad(b, b.op("Mul", g, _per_channel(b, scale, rank)), xhat, inv_std, axes)

    return (d_x,
            lambda: _sum_but_channel(b, b.op("Mul", g, stats()[0]), rank),
            lambda: _sum_but_channel(b, g, rank))


@rule("LayerNormalization", opsets=(17, 10_000))
def _layer_norm(b, n, gy):
    """y = scale * xhat + B, xhat standardized over the axes from `axis` to the last; scale and B broadcast."""
    _only_output_0(b, n, gy, "the Mean and InvStdDev outputs are not differentiated")
    x, scale = n.inputs[:2]
    shape = b.shape(x)
    axis = int(n.attrs.get("axis", -1)) % len(shape)
    axes = list(range(axis, len(shape)))
    eps = float(n.attrs.get("epsilon", 1e-5))
    g = gy[0]
    stats = functools.cache(lambda: _standardize(b, x, axes, eps))

    def d_x():
        xhat, inv_std = stats()
        return _standardized_grad(b, b.op("Mul", g, scale), xhat, inv_std, axes)

    def d_scale():
        return b.broadcast_shaped(b.op("Mul", g, stats()[0]), shape)

    return (d_x, d_scale, lambda: b.broadcast_shaped(g, shape))
