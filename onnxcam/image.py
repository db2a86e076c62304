"""Images: reading, preprocessing into model inputs, resizing maps, and overlays. The only cv2 importer."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from .errors import InputError
from .preprocess import Preprocess

# What a folder run picks up; a file named explicitly is tried whatever its extension.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".gif",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".jp2"})
_MAY_HAVE_ALPHA = frozenset({".png", ".webp", ".tif", ".tiff", ".gif", ".bmp"})


def resize_map(cam: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one 2-D map to (width, height), as pytorch-grad-cam does (cv2 INTER_LINEAR)."""
    return cv2.resize(np.float32(cam), tuple(int(s) for s in size_wh))


def resize_maps(maps: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """resize_map of every (h, w) map of an (N, h, w) stack at once, without a loop over images.

    cv2's INTER_LINEAR is separable: each output pixel mixes two source columns, then two source rows. So the
    whole stack is two matrix products with the per-axis weight matrices, which are read off cv2 itself by
    resizing an identity: the same weights, summed in another order (equal to float32 rounding)."""
    maps = np.asarray(maps, np.float32)
    width, height = (int(s) for s in size_wh)
    if maps.shape[1:] == (height, width):
        return maps.copy()
    across = np.matmul(maps, _linear_weights(maps.shape[2], width).T)  # (N, h, W)
    return np.matmul(_linear_weights(maps.shape[1], height), across)  # (N, H, W)


@functools.lru_cache(maxsize=32)
def _linear_weights(source: int, size: int) -> np.ndarray:
    """(size, source): row i holds the weights cv2's INTER_LINEAR gives each source pixel for output pixel i."""
    weights = cv2.resize(np.eye(source, dtype=np.float32), (size, source)).T
    weights.flags.writeable = False
    return weights


# ---- reading ---------------------------------------------------------------------------------------------------
def read_image(path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3) at its original resolution.

    EXIF orientation is applied; gray becomes 3 equal channels; 16-bit and float images are scaled to 8 bits;
    transparent pixels are composited on white (images with an alpha channel are read as stored, since the
    formats that carry alpha rarely carry an EXIF orientation).
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # not cv2.imread: it returns None for every kind of failure
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"image path is a folder: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    if data.size == 0:
        raise InputError(f"cannot decode image {path}: the file is empty")
    img = None
    if path.suffix.lower() in _MAY_HAVE_ALPHA:
        raw = _decode(data, cv2.IMREAD_UNCHANGED)
        if raw is not None and raw.ndim == 3 and raw.shape[2] in (2, 4):
            img = _composite_on_white(raw)
    if img is None:
        img = _decode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)  # applies the EXIF orientation
    if img is None:
        raise InputError(f"cannot decode image {path}: not an image, or a format OpenCV cannot read")
    return cv2.cvtColor(_to_uint8(img), cv2.COLOR_BGR2RGB)


def _decode(data: np.ndarray, flags: int) -> np.ndarray | None:
    try:
        return cv2.imdecode(data, flags)
    except cv2.error:
        return None


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        top = 1.0 if float(np.nanmax(img)) <= 1.0 else 255.0
        return np.uint8(np.clip(np.nan_to_num(img) * (255.0 / top) + 0.5, 0, 255))
    return np.uint8(np.clip(img, 0, 255))


def _composite_on_white(raw: np.ndarray) -> np.ndarray:
    """(H, W, 2 or 4) gray+alpha or BGRA, any depth -> uint8 BGR over a white background."""
    color, alpha = raw[..., :-1], raw[..., -1:]
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(raw.dtype, 1.0)
    a = alpha.astype(np.float32) / scale
    c = color.astype(np.float32) / scale
    out = c * a + (1.0 - a)
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.uint8(np.clip(out * 255.0 + 0.5, 0, 255))


# ---- model inputs ----------------------------------------------------------------------------------------------
def to_input(rgb: np.ndarray, pre: Preprocess) -> np.ndarray:
    """One uint8 RGB image -> the float32 model input (C, H, W) or (H, W, C), without the batch dimension."""
    h, w = pre.size
    shrink = rgb.shape[0] > h and rgb.shape[1] > w
    img = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if pre.color == "gray":
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None]
    elif pre.color == "bgr":
        img = img[..., ::-1]
    x = (img.astype(np.float32) / 255.0 - np.float32(pre.mean)) / np.float32(pre.std)
    if pre.layout == "nchw":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


# ---- pictures of maps ------------------------------------------------------------------------------------------
def colorize(mask: np.ndarray) -> np.ndarray:
    """A [0, 1] map as a uint8 RGB JET heatmap (the colormap of pytorch-grad-cam's show_cam_on_image)."""
    heat = cv2.applyColorMap(np.uint8(255 * np.clip(mask, 0, 1)), cv2.COLORMAP_JET)
    return cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)


def heatmap(mask: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """The map alone, resized to (width, height) and colorized."""
    return colorize(resize_map(mask, size_wh))


def overlay(rgb: np.ndarray, mask: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """show_cam_on_image(rgb / 255, mask, use_rgb=True) at the image's own resolution (the map is resized to it).

    Heatmap and image blended (1 - image_weight) : image_weight, divided by the maximum, as uint8 RGB.
    """
    h, w = rgb.shape[:2]
    heat = np.float32(colorize(resize_map(mask, (w, h)))) / 255
    cam = (1 - image_weight) * heat + image_weight * (np.float32(rgb) / 255)
    cam = cam / np.max(cam)
    return np.uint8(255 * cam)


def side_by_side(left: np.ndarray, right: np.ndarray, height: int | None = None) -> np.ndarray:
    """Two RGB images scaled to one height and put next to each other (a picture holding two objects)."""
    height = height or min(left.shape[0], right.shape[0])

    def fit(img):
        w = max(1, round(img.shape[1] * height / img.shape[0]))
        return cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA)

    return np.concatenate([fit(left), fit(right)], axis=1)


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 RGB (H, W, 3) -> PNG bytes."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError(f"OpenCV could not encode a PNG of shape {rgb.shape}")
    return buf.tobytes()
