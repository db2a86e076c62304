"""First principal component of a layer's (weighted) activations, per image: Eigen-CAM's and KPCA-CAM's projection.

Each image's activations (C, h, w) are seen as h*w samples of C features, centred per feature. The map is every
sample's coordinate on the first principal axis. A principal axis has no sign of its own; the conventions below are
the ones pytorch-grad-cam 1.5.7 inherits from its solvers, so that the maps agree:
- linear PCA: the first right singular vector exactly as numpy's LAPACK SVD returns it;
- kernel PCA: scikit-learn's KernelPCA(n_components=1) -- the centred kernel's top eigenvector, signed so that its
  largest-magnitude entry is positive, scaled by sqrt(eigenvalue) (negative eigenvalues count as 0).
When the first two singular values (eigenvalues) nearly tie, the axis itself is ill-defined and tiny differences in
the activations can turn it: no implementation can promise the same map there.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

KERNELS = ("linear", "poly", "rbf", "sigmoid", "cosine")


def _samples(activations: np.ndarray) -> np.ndarray:
    """(C, h, w) -> centred (h*w, C)."""
    x = activations.reshape(activations.shape[0], -1).transpose()
    return x - x.mean(axis=0)


def get_2d_projection(activation_batch: np.ndarray) -> np.ndarray:
    """(N, C, h, w) -> (N, h, w): projection on the first principal axis (NaNs count as 0)."""
    batch = np.where(np.isnan(activation_batch), 0, activation_batch).astype(activation_batch.dtype, copy=False)
    projections = []
    for activations in batch:
        x = _samples(activations)
        # pytorch-grad-cam asks for full matrices; the first right singular vector comes out the same (sign
        # included: tests/test_cam_api.py) without the C x C matrix, 25x faster at 7x7x1280.
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        projections.append((x @ vt[0, :]).reshape(activations.shape[1:]))
    return np.float32(projections)


def get_2d_projection_kernel(activation_batch: np.ndarray, kernel: str = "sigmoid",
                             gamma: float | None = None) -> np.ndarray:
    """(N, C, h, w) -> (N, h, w): projection on the first kernel principal axis (scikit-learn's defaults:
    gamma = 1 / C, coef0 = 1, degree = 3)."""
    if kernel not in KERNELS:
        raise InputError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
    batch = np.where(np.isnan(activation_batch), 0, activation_batch).astype(activation_batch.dtype, copy=False)
    projections = []
    for activations in batch:
        x = _samples(activations)
        k = _center(_kernel(x, kernel, 1.0 / x.shape[1] if gamma is None else gamma))
        values, vectors = np.linalg.eigh(k)
        value, vector = max(values[-1], 0), vectors[:, -1]
        vector = vector * np.sign(vector[np.argmax(np.abs(vector))])
        projections.append((vector * np.sqrt(value)).reshape(activations.shape[1:]))
    return np.float32(projections)


def _kernel(x: np.ndarray, kernel: str, gamma: float) -> np.ndarray:
    if kernel == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms == 0, 1, norms)
        return x @ x.T
    dot = x @ x.T
    if kernel == "linear":
        return dot
    if kernel == "poly":
        return (gamma * dot + 1) ** 3
    if kernel == "sigmoid":
        return np.tanh(gamma * dot + 1)
    sq = np.sum(x * x, axis=1)  # rbf
    return np.exp(-gamma * np.maximum(sq[:, None] + sq[None, :] - 2 * dot, 0))


def _center(k: np.ndarray) -> np.ndarray:
    """Double-centre a kernel matrix (the kernel of the centred feature-space samples)."""
    rows = k.sum(axis=0) / k.shape[0]
    return k - rows[None, :] - (k.sum(axis=1) / k.shape[0])[:, None] + rows.sum() / k.shape[0]
