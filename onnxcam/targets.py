"""Targets with pytorch-grad-cam's names: `from onnxcam.targets import ClassifierOutputTarget`."""

from .cam.targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    RawScoresOutputTarget,
    SemanticSegmentationTarget,
    as_target,
    seeds,
)

__all__ = [
    "BinaryClassifierOutputTarget",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "RawScoresOutputTarget",
    "SemanticSegmentationTarget",
    "as_target",
    "seeds",
]
