"""pytorch-grad-cam 1.5.7's cam_mult_image metrics: the target score of input x map against that of the input."""

from __future__ import annotations

import numpy as np

from .perturbation_confidence import PerturbationConfidenceMetric


def multiply_tensor_with_cam(input_tensor: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """An input (after normalization) multiplied by its map, broadcast over the channels."""
    return input_tensor * cam


class CamMultImageConfidenceChange(PerturbationConfidenceMetric):
    """target(input x map) - target(input), per sample."""

    def __init__(self):
        super().__init__(multiply_tensor_with_cam)


class DropInConfidence(CamMultImageConfidenceChange):
    """max(0, target(input) - target(input x map)), per sample."""

    def __call__(self, *args, **kwargs):
        result = super().__call__(*args, **kwargs)
        if isinstance(result, tuple):
            return np.maximum(-result[0], 0), result[1]
        return np.maximum(-result, 0)


class IncreaseInConfidence(CamMultImageConfidenceChange):
    """1.0 where target(input x map) > target(input), else 0.0, per sample."""

    def __call__(self, *args, **kwargs):
        result = super().__call__(*args, **kwargs)
        if isinstance(result, tuple):
            return np.float32(result[0] > 0), result[1]
        return np.float32(result > 0)
