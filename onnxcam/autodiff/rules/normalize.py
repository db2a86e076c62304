"""Normalizations in inference form: BatchNormalization (running statistics), Instance- and LayerNormalization."""

from __future__ import annotations

from . import rule


@rule("BatchNormalization")
def _batch_norm(b, n, gy):
    """Inference BN is per-channel affine: dx = gy * scale / sqrt(var + eps) (channels on axis 1)."""
    x, scale, _, _, var = n.inputs[:5]
    if int(n.attrs.get("training_mode", 0)):
        raise b.error("is in training mode; only inference BatchNormalization is supported")
    eps = float(n.attrs.get("epsilon", 1e-5))
    rank = len(b.shape(x))

    def grad():
        factor = b.op("Div", scale, b.op("Sqrt", b.op("Add", var, eps)))
        factor = b.unsqueeze(factor, list(range(1, rank - 1)))  # (C,) -> (C, 1, 1, ...)
        return b.op("Mul", gy[0], factor)
    return (grad, None, None, None, None)
