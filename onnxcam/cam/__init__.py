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
from .feature_factorization import DeepFeatureFactorization
from .fullgrad import FullGrad
from .gradient_free import AblationCAM, ScoreCAM
from .guided import GuidedBackprop, GuidedBackpropReLUModel, GuidedGradCAM
from .methods import METHODS
from .postprocess import deprocess_image, scale_cam_image
from .shapley import ShapleyCAM
from .targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    RawScoresOutputTarget,
    SemanticSegmentationTarget,
)
from .torchcam_methods import ISCAM, SSCAM, SmoothGradCAMpp

__all__ = [
    "CAM",
    "CLASSES",
    "CLASS_AGNOSTIC",
    "FEM",
    "ISCAM",
    "KPCA_CAM",
    "METHODS",
    "REGISTRY",
    "SSCAM",
    "AblationCAM",
    "BaseCAM",
    "BinaryClassifierOutputTarget",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "CounterfactualGradCAM",
    "DeepFeatureFactorization",
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
    "ShapleyCAM",
    "SmoothGradCAMpp",
    "XGradCAM",
    "deprocess_image",
    "explain",
    "scale_cam_image",
]
