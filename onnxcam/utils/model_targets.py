"""pytorch-grad-cam 1.5.7's `utils.model_targets` module path: every target class, on numpy outputs.

A re-export of onnxcam.cam.targets (the one implementation; see its docstring): a target is called on one sample's
output (`target(output)`, the score a metric reads) and gives the gradient of that score with respect to the output
(`seed(output)`, what the CAM classes differentiate).
"""

from ..cam.targets import (
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
]
