"""onnxcam: Grad-CAM, HiResCAM and friends for any image model exported to ONNX, in one onnxruntime run."""

from __future__ import annotations

from pathlib import Path as _Path

from . import cache
from .cam import (
    CAM,
    FEM,
    ISCAM,
    KPCA_CAM,
    SSCAM,
    AblationCAM,
    CounterfactualGradCAM,
    DeepFeatureFactorization,
    EigenCAM,
    EigenGradCAM,
    Explanation,
    FinerCAM,
    FullGrad,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GradientXInput,
    GuidedBackprop,
    GuidedBackpropReLUModel,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    RandomCAM,
    Saliency,
    ScoreCAM,
    ShapleyCAM,
    SmoothGradCAMpp,
    XGradCAM,
    explain,
)
from .errors import (
    DeviceError,
    InputError,
    InternalError,
    LayerError,
    ModelError,
    NumericalError,
    OnnxCamError,
    UnsupportedOpError,
)
from .explainer import Explainer, Result

__version__ = "0.1.0"
DATA = _Path(__file__).parent / "data"
BUNDLED_MODEL = DATA / "efficientnet_lite0.onnx"  # EfficientNet-Lite0, ImageNet weights, preprocessing in metadata
SAMPLE_IMAGES = tuple(sorted(p for p in (DATA / "samples").iterdir() if p.suffix in (".png", ".jpg")))
__all__ = [
    "BUNDLED_MODEL",
    "CAM",
    "FEM",
    "ISCAM",
    "KPCA_CAM",
    "SAMPLE_IMAGES",
    "SSCAM",
    "AblationCAM",
    "CounterfactualGradCAM",
    "DeepFeatureFactorization",
    "DeviceError",
    "EigenCAM",
    "EigenGradCAM",
    "Explainer",
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
    "InputError",
    "InternalError",
    "LayerCAM",
    "LayerError",
    "ModelError",
    "NumericalError",
    "OnnxCamError",
    "RandomCAM",
    "Result",
    "Saliency",
    "ScoreCAM",
    "ShapleyCAM",
    "SmoothGradCAMpp",
    "UnsupportedOpError",
    "XGradCAM",
    "__version__",
    "cache",
    "explain",
]
