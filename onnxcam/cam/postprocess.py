"""pytorch-grad-cam 1.5.7's post-processing, step for step, so identical inputs give identical maps."""

from __future__ import annotations

import numpy as np

from ..image import resize_map


def scale_cam_image(cam: np.ndarray, target_size: tuple[int, int] | None = None) -> np.ndarray:
    """Per image: subtract the min, divide by (1e-7 + max), optionally resize to target_size = (W, H)."""
    result = []
    for img in cam:
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        if target_size is not None:
            img = resize_map(img, target_size)
        result.append(img)
    return np.float32(result)


def layer_map(raw: np.ndarray, target_size: tuple[int, int]) -> np.ndarray:
    """One layer's raw (N, h, w) map -> ReLU -> per-image min-max scaling -> resized (N, H, W)."""
    return scale_cam_image(np.maximum(raw, 0), target_size)


def aggregate_layers(per_layer: list[np.ndarray]) -> np.ndarray:
    """Several layers' scaled maps -> ReLU -> mean over layers -> scaled again (also with a single layer)."""
    stacked = np.concatenate([m[:, None, :, :] for m in per_layer], axis=1)
    stacked = np.maximum(stacked, 0)
    return scale_cam_image(np.mean(stacked, axis=1))


def deprocess_image(img: np.ndarray) -> np.ndarray:
    """A guided-backprop map (H, W, C) -> uint8 for display: standardise, scale by 0.1 around 0.5, clip (as
    pytorch-grad-cam's deprocess_image, after the Keras Grad-CAM example)."""
    img = img - np.mean(img)
    img = img / (np.std(img) + 1e-5)
    img = np.clip(img * 0.1 + 0.5, 0, 1)
    return np.uint8(img * 255)
