"""pytorch-grad-cam 1.5.7's post-processing, step for step, so identical inputs give identical maps."""

from __future__ import annotations

import numpy as np

from ..image import resize_map


def scale_cam_image(cam: np.ndarray, target_size: tuple[int, int] | None = None) -> np.ndarray:
    """Per image: subtract the min, divide by (1e-7 + max), optionally resize to target_size = (W, H)."""
    if target_size is None:  # the same arithmetic for all images at once
        return _scale_in_place(np.array(cam, np.float32))
    out = np.empty((len(cam), target_size[1], target_size[0]), np.float32)
    for i, img in enumerate(cam):
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        out[i] = resize_map(img, target_size)
    return out


def _scale_in_place(cam: np.ndarray) -> np.ndarray:
    """scale_cam_image's arithmetic on an (N, H, W) float32 array this module owns (no full-size temporaries)."""
    cam -= np.min(cam, axis=(1, 2), keepdims=True)
    cam /= np.float32(1e-7) + np.max(cam, axis=(1, 2), keepdims=True)
    return cam


def layer_map(raw: np.ndarray, target_size: tuple[int, int]) -> np.ndarray:
    """One layer's raw (N, h, w) map -> ReLU -> per-image min-max scaling -> resized (N, H, W)."""
    return scale_cam_image(np.maximum(raw, 0), target_size)


def aggregate_layers(per_layer: list[np.ndarray]) -> np.ndarray:
    """Several layers' scaled maps -> ReLU -> mean over layers -> scaled again (also with a single layer)."""
    if len(per_layer) == 1:  # the mean of one layer is that layer, exactly
        return _scale_in_place(np.maximum(np.asarray(per_layer[0], np.float32), 0))
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
