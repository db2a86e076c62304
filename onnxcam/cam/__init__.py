"""Class activation maps: pure numpy methods, pytorch-grad-cam's classes and post-processing, targets, explain()."""

from .api import CLASS_AGNOSTIC, CLASSES, REGISTRY, Explanation, MethodInfo, explain
from .base import BaseCAM
from .cams import (
    CAM,
    FEM,
    KPCA_CAM,
    CounterfactualGradCAM,
    EigenCAM,
    EigenGradCAM,
    FinerCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GradientXInput,
    HiResCAM,
    LayerCAM,
    RandomCAM,
    Saliency,
    XGradCAM,
)
from .fullgrad import FullGrad
from .gradient_free import AblationCAM, ScoreCAM
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
    "CLASS_AGNOSTIC",
    "FEM",
    "KPCA_CAM",
    "METHODS",
    "REGISTRY",
    "AblationCAM",
    "BaseCAM",
    "BinaryClassifierOutputTarget",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "CounterfactualGradCAM",
    "EigenCAM",
    "EigenGradCAM",
    "Explanation",
    "FinerCAM",
    "FullGrad",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradientXInput",
    "GuidedBackprop",
    "GuidedBackpropReLUModel",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "MethodInfo",
    "RandomCAM",
    "RawScoresOutputTarget",
    "Saliency",
    "ScoreCAM",
    "SemanticSegmentationTarget",
    "XGradCAM",
    "deprocess_image",
    "explain",
    "scale_cam_image",
]
