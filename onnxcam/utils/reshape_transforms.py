"""pytorch-grad-cam 1.5.7's `utils.reshape_transforms` on numpy arrays: token or channels-last activations -> the
(N, C, h, w) maps the CAM methods take. Pass one as `reshape_transform=` to an onnxcam CAM class (it is applied to
the activations and to the gradients)."""

from __future__ import annotations

import numpy as np

from ..errors import InputError

__all__ = ["bilinear_resize", "fasterrcnn_reshape_transform", "swinT_reshape_transform", "vit_reshape_transform"]


def vit_reshape_transform(tensor: np.ndarray, height: int = 14, width: int = 14) -> np.ndarray:
    """ViT tokens (N, 1 + h*w, C), class token first -> (N, C, h, w) without the class token."""
    tensor = np.asarray(tensor)
    _expect_tokens(tensor, height * width + 1, "vit_reshape_transform", "1 + height * width")
    return tensor[:, 1:, :].reshape(tensor.shape[0], height, width, tensor.shape[2]).transpose(0, 3, 1, 2)


def swinT_reshape_transform(tensor: np.ndarray, height: int = 7, width: int = 7) -> np.ndarray:
    """Swin tokens (N, h*w, C) (or (N, h, w, C)) -> (N, C, h, w)."""
    tensor = np.asarray(tensor)
    if tensor.ndim == 4:
        tensor = tensor.reshape(tensor.shape[0], -1, tensor.shape[3])
    _expect_tokens(tensor, height * width, "swinT_reshape_transform", "height * width")
    return tensor.reshape(tensor.shape[0], height, width, tensor.shape[2]).transpose(0, 3, 1, 2)


def fasterrcnn_reshape_transform(x: dict) -> np.ndarray:
    """An FPN's levels {name: (N, C, h, w)}: each level's absolute value resized (bilinear, half-pixel centres, as
    torch.nn.functional.interpolate) to the size of level 'pool', concatenated along the channels."""
    if not isinstance(x, dict) or "pool" not in x:
        raise InputError("fasterrcnn_reshape_transform needs a dict of FPN levels {name: (N, C, h, w)} with a 'pool' "
                         f"level, not {type(x).__name__}" + (f" with keys {list(x)}" if isinstance(x, dict) else ""))
    size = np.asarray(x["pool"]).shape[-2:]
    return np.concatenate([bilinear_resize(np.abs(np.asarray(v)), size) for v in x.values()], axis=1)


def bilinear_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) -> (..., H, W) bilinear with align_corners=False and no antialiasing (torch's 'bilinear')."""
    x = np.asarray(x)
    rows = _linear_matrix(x.shape[-2], int(size[0]), x.dtype)
    cols = _linear_matrix(x.shape[-1], int(size[1]), x.dtype)
    return np.matmul(np.matmul(rows, x), cols.T)


def _linear_matrix(source: int, size: int, dtype) -> np.ndarray:
    """(size, source): output i samples source coordinate (i + 0.5) * source / size - 0.5, clamped at 0."""
    scale = source / size
    coord = np.maximum((np.arange(size) + 0.5) * scale - 0.5, 0)
    low = np.minimum(np.floor(coord).astype(int), source - 1)
    high = np.minimum(low + 1, source - 1)
    frac = coord - low
    m = np.zeros((size, source), np.float64)
    np.add.at(m, (np.arange(size), low), 1 - frac)
    np.add.at(m, (np.arange(size), high), frac)
    return m.astype(dtype if np.issubdtype(dtype, np.floating) else np.float64)


def _expect_tokens(tensor: np.ndarray, tokens: int, who: str, formula: str) -> None:
    if tensor.ndim != 3 or tensor.shape[1] != tokens:
        raise InputError(f"{who} needs tokens (N, {formula} = {tokens}, C), not an array of shape {tensor.shape}: "
                         "give the height and width of the token grid")
