"""pytorch-grad-cam 1.5.7's ARCC metric (after ADCC, arXiv 2104.10252): the harmonic mean of coherency,
1 - complexity and a clipped ROADCombined, per sample. Higher is better."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..cam.targets import _numpy
from ._scoring import as_input
from .road import ROADCombined


def batch_pearson_coherency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of maps (N, ...) x (N, ...), with 1e-8 added to the product of the
    standard deviations."""
    a = a.reshape(len(a), -1)
    b = b.reshape(len(b), -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    dof = a.shape[1] - 1
    cov = (a * b).sum(axis=1) / dof
    return cov / (np.sqrt((a**2).sum(axis=1) / dof) * np.sqrt((b**2).sum(axis=1) / dof) + 1e-8)


class Complexity:
    """The mean absolute value of each map (0: an empty map, 1: a map of all ones)."""

    def __call__(self, grayscale_cams) -> np.ndarray:
        cams = np.asarray(_numpy(grayscale_cams))
        return np.abs(cams.reshape(len(cams), -1)).sum(axis=1) / cams[0].size


class Coherency:
    """(Pearson correlation + 1) / 2 between each map and the map the same method makes of the input multiplied by
    that map (base_method: an onnxcam CAM object)."""

    def __call__(self, input_tensor, grayscale_cams, targets, model, base_method) -> np.ndarray:
        x = as_input(input_tensor)
        cams = np.asarray(_numpy(grayscale_cams), np.float32)
        mixed_cams = base_method(input_tensor=x * cams[:, None], targets=targets)
        return (batch_pearson_coherency(mixed_cams, cams) + 1) / 2


class ARCC:
    """3 / (1 / coherency + 1 / (1 - complexity) + 1 / road) per sample (each term + 1e-8), where road is
    ROADCombined over road_percentiles, doubled and clipped to [0, 1]."""

    def __init__(self, base_method, road_percentiles: Sequence[float] = (20, 40, 60, 80), *, noise: float = 0.01,
                 rng: np.random.Generator | int | None = None, solver: str = "auto"):
        self.complexity = Complexity()
        self.coherency = Coherency()
        self.road = ROADCombined(road_percentiles, noise=noise, rng=rng, solver=solver)
        self.base_method = base_method

    def __call__(self, input_tensor, grayscale_cams, targets, model) -> np.ndarray:
        complexity = self.complexity(grayscale_cams)
        coherency = self.coherency(input_tensor, grayscale_cams, targets, model, self.base_method)
        road = (self.road(input_tensor, grayscale_cams, targets, model) * 2).clip(0, 1)
        return 3 * (1 / (coherency + 1e-8) + 1 / ((1 - complexity) + 1e-8) + 1 / (road + 1e-8)) ** -1
