"""Class activation maps: pure numpy methods, pytorch-grad-cam's classes and post-processing, targets, explain()."""

from .api import CLASSES, Explanation, explain
from .base import BaseCAM
from .cams import (
    CAM,
    KPCA_CAM,
    CounterfactualGradCAM,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GradientXInput,
    HiResCAM,
    LayerCAM,
    Saliency,
    XGradCAM,
)
from .guided import GuidedBackprop, GuidedBackpropReLUModel, GuidedGradCAM
from .methods import METHODS
from .postprocess import deprocess_image, scale_cam_image
from .targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    RawScoresOutputTarget,
    SemanticSegmentationTarget,
)

__all__ = [
    "CAM",
    "CLASSES",
    "KPCA_CAM",
    "METHODS",
    "BaseCAM",
    "BinaryClassifierOutputTarget",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "CounterfactualGradCAM",
    "EigenCAM",
    "EigenGradCAM",
    "Explanation",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradientXInput",
    "GuidedBackprop",
    "GuidedBackpropReLUModel",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "RawScoresOutputTarget",
    "Saliency",
    "SemanticSegmentationTarget",
    "XGradCAM",
    "deprocess_image",
    "explain",
    "scale_cam_image",
]
