"""Targets with pytorch-grad-cam's names: `from onnxcam.targets import ClassifierOutputTarget`.

A re-export of onnxcam.cam.targets, the one implementation (also at pytorch-grad-cam's path,
onnxcam.utils.model_targets).
"""

from .cam.targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputReST,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    FasterRCNNBoxScoreTarget,
    FinerWeightedTarget,
    RawScoresOutputTarget,
    SemanticSegmentationTarget,
    SoftmaxOutputTarget,
    as_target,
    seeds,
)

__all__ = [
    "BinaryClassifierOutputTarget",
    "ClassifierOutputReST",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "FasterRCNNBoxScoreTarget",
    "FinerWeightedTarget",
    "RawScoresOutputTarget",
    "SemanticSegmentationTarget",
    "SoftmaxOutputTarget",
    "as_target",
    "seeds",
]
