"""QuantizeLinear / DequantizeLinear: the straight-through estimator, so a QDQ pair passes gradients unchanged."""

from __future__ import annotations

from . import rule
