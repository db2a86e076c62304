"""pytorch-grad-cam 1.5.7's `pytorch_grad_cam.utils` module paths, on numpy: replacing `pytorch_grad_cam` by
`onnxcam` in an import is the whole change (image, model_targets, reshape_transforms)."""

from . import image, model_targets, reshape_transforms
from .image import deprocess_image

__all__ = ["deprocess_image", "image", "model_targets", "reshape_transforms"]
