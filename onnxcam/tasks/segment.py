"""Segmentation outputs: (N, K, H, W) class logits and DBNet-style single probability maps (N, 1, H, W).

A class's target is pytorch-grad-cam's SemanticSegmentationTarget: the sum of the class's logits over a mask, by
default the pixels where the class wins the argmax (for a single map: where it exceeds a threshold, DBNet's 0.3 on
its probability map). The seed is that mask on the class's channel: linear, so one run explains it.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

DBNET_THRESHOLD = 0.3


def check_output(shape: tuple, name: str = "output") -> None:
    """InputError unless one sample's output is (K, H, W) with a spatial size."""
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise InputError(f"output {name!r} has per-sample shape {tuple(shape)}: segmentation needs (K, H, W) maps "
                         "(N, K, H, W) outputs; give the output holding the class maps (output=)")


def class_mask(sample: np.ndarray, category: int, threshold: float = DBNET_THRESHOLD) -> np.ndarray:
    """(H, W) float mask of the pixels of `category`: its argmax pixels, or for one map those above threshold."""
    sample = np.asarray(sample)
    check_output(sample.shape)
    if not 0 <= category < sample.shape[0]:
        raise InputError(f"class {category} is out of range: the output has {sample.shape[0]} class maps "
                         f"(0 to {sample.shape[0] - 1})")
    if sample.shape[0] == 1:
        return np.float32(sample[0] > threshold)
    return np.float32(sample.argmax(axis=0) == category)


def classes_present(sample: np.ndarray, threshold: float = DBNET_THRESHOLD, min_pixels: int = 1) -> list[int]:
    """The classes that win at least min_pixels pixels of the argmax (for one map: 0 when any pixel exceeds the
    threshold), largest area first."""
    sample = np.asarray(sample)
    check_output(sample.shape)
    if sample.shape[0] == 1:
        return [0] if int((sample[0] > threshold).sum()) >= min_pixels else []
    counts = np.bincount(sample.argmax(axis=0).ravel(), minlength=sample.shape[0])
    return [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] >= min_pixels]


class ClassMaskTarget:
    """The sum of class `category`'s scores over `mask` ((H, W); default: the class's own argmax pixels, read
    from the output, or for a single map the pixels above `threshold`)."""

    def __init__(self, category: int, mask: np.ndarray | None = None, threshold: float = DBNET_THRESHOLD):
        self.category, self.threshold = int(category), threshold
        self.mask = None if mask is None else np.asarray(mask, np.float32)
        self.needs_output = mask is None

    def mask_for(self, sample: np.ndarray) -> np.ndarray:
        if self.mask is None:
            return class_mask(sample, self.category, self.threshold)
        check_output(np.shape(sample))
        if self.mask.shape != np.shape(sample)[1:]:
            raise InputError(f"{self!r}: the mask is {self.mask.shape}, the output's maps are {np.shape(sample)[1:]}")
        return self.mask

    def seed(self, output: np.ndarray) -> np.ndarray:
        mask = self.mask_for(output)
        if not 0 <= self.category < np.shape(output)[0]:
            raise InputError(f"class {self.category} is out of range: the output has {np.shape(output)[0]} class maps")
        seed = np.zeros(np.shape(output), np.float32)
        seed[self.category] = mask
        return seed

    def __call__(self, output: np.ndarray) -> float:
        return float((np.asarray(output)[self.category] * self.mask_for(output)).sum())

    def __repr__(self) -> str:
        return f"ClassMaskTarget({self.category}, {'argmax mask' if self.mask is None else 'given mask'})"
