"""CAM methods as pure functions of a layer's activations A and gradients G, both (N, C, h, w).

Each returns the raw low-resolution map (N, h, w) before ReLU and scaling.
"""

from __future__ import annotations

import numpy as np


def gradcam(activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., arXiv 1610.02391): channel weights = spatially averaged gradients."""
    weights = np.mean(grads, axis=(2, 3))
    return (weights[:, :, None, None] * activations).sum(axis=1)


def hirescam(activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """HiResCAM (Draelos & Carin, arXiv 2011.08891): gradient x activation summed over channels."""
    return (grads * activations).sum(axis=1)


METHODS = {"gradcam": gradcam, "hirescam": hirescam}
