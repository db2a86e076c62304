"""onnxcam: Grad-CAM, HiResCAM and friends for any image model exported to ONNX, in one onnxruntime run."""

from __future__ import annotations

from .cam import (
    CAM,
    KPCA_CAM,
    CounterfactualGradCAM,
    EigenCAM,
    EigenGradCAM,
    Explanation,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GradientXInput,
    GuidedBackprop,
    GuidedBackpropReLUModel,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    Saliency,
    XGradCAM,
    explain,
)
from .errors import DeviceError, InputError, LayerError, ModelError, OnnxCamError, UnsupportedOpError
from .explainer import Explainer, Result

__version__ = "0.1.0"
__all__ = [
    "CAM",
    "KPCA_CAM",
    "CounterfactualGradCAM",
    "DeviceError",
    "EigenCAM",
    "EigenGradCAM",
    "Explainer",
    "Explanation",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradientXInput",
    "GuidedBackprop",
    "GuidedBackpropReLUModel",
    "GuidedGradCAM",
    "HiResCAM",
    "InputError",
    "LayerCAM",
    "LayerError",
    "ModelError",
    "OnnxCamError",
    "Result",
    "Saliency",
    "UnsupportedOpError",
    "XGradCAM",
    "__version__",
    "explain",
]
