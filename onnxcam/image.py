"""Images: reading, preprocessing into model inputs, resizing maps, and overlays. The only cv2 importer."""

from __future__ import annotations

import cv2
import numpy as np


def resize_map(cam: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one 2-D map to (width, height), as pytorch-grad-cam does (cv2 INTER_LINEAR)."""
    return cv2.resize(np.float32(cam), tuple(int(s) for s in size_wh))
