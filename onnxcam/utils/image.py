"""pytorch-grad-cam 1.5.7's `utils.image`, with the same signatures and exactly equal outputs, in numpy.

preprocess_image returns a numpy float32 (1, 3, H, W) array (pytorch-grad-cam returns a torch tensor holding the
same values); onnxcam's CAM classes and metrics take numpy. Bad input raises InputError where pytorch-grad-cam
raises a bare Exception.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np

from ..cam.postprocess import deprocess_image
from ..errors import InputError
from ..image import resize_map

log = logging.getLogger(__name__)

__all__ = ["deprocess_image", "preprocess_image", "scale_accross_batch_and_channels", "scale_cam_image",
           "show_cam_on_image"]


def preprocess_image(img: np.ndarray, mean: Sequence[float] = (0.5, 0.5, 0.5),
                     std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """An (H, W, C) image -> (1, C, H, W) float32 `(x - mean) / std`, as torchvision's ToTensor + Normalize.

    uint8 images are divided by 255 first (ToTensor); float images are taken as they are, computed in their own
    precision as torchvision does, then returned as float32."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise InputError(f"preprocess_image needs an (H, W, C) or (H, W) image, not an array of shape {img.shape}")
    if img.dtype == np.uint8:
        x = img.astype(np.float32) / np.float32(255)
    elif np.issubdtype(img.dtype, np.floating):
        x = img
    else:
        raise InputError(f"preprocess_image needs a uint8 or float image, not {img.dtype}")
    mean = np.asarray(mean, dtype=x.dtype).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=x.dtype).reshape(-1, 1, 1)
    if np.any(std == 0):
        raise InputError(f"preprocess_image: std {std.ravel().tolist()} has a zero (division by zero)")
    if mean.shape[0] not in (1, img.shape[2]) or std.shape[0] not in (1, img.shape[2]):
        raise InputError(f"preprocess_image: mean and std need one value per channel ({img.shape[2]}), "
                         f"not {mean.shape[0]} and {std.shape[0]}")
    chw = x.transpose(2, 0, 1)
    return np.ascontiguousarray(((chw - mean) / std)[None], dtype=np.float32)


def show_cam_on_image(img: np.ndarray, mask: np.ndarray, use_rgb: bool = False, colormap: int = cv2.COLORMAP_JET,
                      image_weight: float = 0.5) -> np.ndarray:
    """The map `mask` as a heatmap blended on `img` (float in [0, 1]): uint8, BGR unless use_rgb.

    `(1 - image_weight) * heatmap + image_weight * img`, divided by its maximum."""
    img = np.asarray(img)
    if np.max(img) > 1:
        raise InputError("show_cam_on_image needs the image as floats in [0, 1] (divide a uint8 image by 255)")
    if not 0 <= image_weight <= 1:
        raise InputError(f"show_cam_on_image: image_weight must be in [0, 1], not {image_weight}")
    heatmap = cv2.applyColorMap(np.uint8(255 * np.asarray(mask)), colormap)
    if use_rgb:
        heatmap = cv2.cvtColor(heatmap, cv2.COLOR_BGR2RGB)
    heatmap = np.float32(heatmap) / 255
    cam = (1 - image_weight) * heatmap + image_weight * img
    cam = cam / np.max(cam)
    return np.uint8(255 * cam)


def scale_cam_image(cam: np.ndarray, target_size: tuple[int, int] | None = None) -> np.ndarray:
    """Per map: subtract the min, divide by (1e-7 + max), then resize to target_size = (W, H) (bilinear, as cv2).

    One map at a time, the very arithmetic of pytorch-grad-cam (onnxcam.cam.scale_cam_image is its batched form,
    equal to float32 rounding). 3-D maps are resized with scipy.ndimage.zoom, as there (scipy is then needed)."""
    result = []
    for img in cam:
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        if target_size is not None:
            img = _zoom(img, target_size) if img.ndim > 2 else resize_map(img, target_size)
        result.append(img)
    return np.float32(result)


def scale_accross_batch_and_channels(tensor: np.ndarray, target_size: tuple[int, int]) -> np.ndarray:
    """scale_cam_image of every (N, C) map of an (N, C, h, w) array, each resized to target_size = (W, H)."""
    n, c = tensor.shape[:2]
    scaled = scale_cam_image(tensor.reshape(n * c, *tensor.shape[2:]), target_size)
    return scaled.reshape(n, c, target_size[1], target_size[0])


def _zoom(img: np.ndarray, target_size) -> np.ndarray:
    try:
        from scipy.ndimage import zoom  # only 3-D maps need it: an optional dependency
    except ImportError as exc:
        raise InputError("scale_cam_image resizes 3-D maps with scipy.ndimage.zoom: install scipy") from exc
    return zoom(np.float32(img), [t / s for s, t in zip(img.shape, target_size[::-1])])
