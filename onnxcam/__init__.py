"""onnxcam: Grad-CAM, HiResCAM and friends for any image model exported to ONNX, in one onnxruntime run."""

from __future__ import annotations

from .errors import DeviceError, InputError, LayerError, ModelError, OnnxCamError, UnsupportedOpError
from .explainer import Explainer, Result

__version__ = "0.1.0"
__all__ = ["Explainer", "Result", "OnnxCamError", "ModelError", "UnsupportedOpError", "LayerError",
           "InputError", "DeviceError", "__version__"]
