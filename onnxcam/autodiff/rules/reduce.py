"""Reductions: the gradient is gy broadcast back over the reduced axes (scaled for the mean, masked for max/min)."""

from __future__ import annotations

from . import rule
