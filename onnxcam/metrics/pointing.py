"""Localization metrics of maps against ground-truth objects, given as boxes or masks.

- pointing_game (Zhang et al., arXiv 1608.00507): a hit when the map's maximum falls in the object, within
  `tolerance` pixels (15 in the paper);
- energy_pointing_game (Score-CAM, arXiv 1910.01279): the share of the map's total inside the object.

boxes: per sample, one (x1, y1, x2, y2) box or a (K, 4) array of boxes (the object is their union), in pixels of
the map: pixel (row r, column c) is inside when x1 <= c < x2 and y1 <= r < y2. masks: per sample, an (H, W) array,
nonzero inside the object. Pure numpy: no model run.
"""

from __future__ import annotations

import numpy as np

from ..cam.targets import _numpy
from ..errors import InputError


def object_masks(shape: tuple[int, int, int], boxes=None, masks=None) -> np.ndarray:
    """(N, H, W) bool: each sample's object, from its boxes or its mask (exactly one of the two)."""
    n, h, w = shape
    if (boxes is None) == (masks is None):
        raise InputError("the pointing game needs the objects: give boxes (x1, y1, x2, y2 per sample) or masks "
                         "(H, W per sample), one of the two" + ("" if boxes is None else ", not both"))
    if masks is not None:
        masks = np.asarray(_numpy(masks))
        if masks.shape != (n, h, w):
            raise InputError(f"masks must be (N, H, W) = {(n, h, w)} like the maps, not {masks.shape}")
        return masks != 0
    boxes = list(boxes)
    if len(boxes) != n:
        raise InputError(f"{len(boxes)} box entries for {n} maps: give the boxes of every sample")
    out = np.zeros((n, h, w), bool)
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    for i, sample in enumerate(boxes):
        sample = np.asarray(_numpy(sample), np.float64).reshape(-1, 4) if np.size(sample) else np.zeros((0, 4))
        for x1, y1, x2, y2 in sample:
            if not (x1 < x2 and y1 < y2):
                raise InputError(f"box {[x1, y1, x2, y2]} of sample {i} is empty: boxes are (x1, y1, x2, y2), "
                                 "x1 < x2 and y1 < y2")
            out[i] |= (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)
    return out


def pointing_game(cams, boxes=None, masks=None, tolerance: float = 15) -> np.ndarray:
    """(N,) bool: whether each map's maximum (its first in row-major order) lies within `tolerance` pixels
    (Euclidean) of the object. The hit rate is the mean."""
    cams = _maps(cams)
    objects = object_masks(cams.shape, boxes, masks)
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0 pixels, not {tolerance}")
    n, h, w = cams.shape
    peaks = np.argmax(cams.reshape(n, -1), axis=1)
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    hits = np.zeros(n, bool)
    for i, peak in enumerate(peaks):
        r, c = divmod(int(peak), w)
        near = (rows - r) ** 2 + (cols - c) ** 2 <= tolerance**2
        hits[i] = bool(np.any(near & objects[i]))
    return hits


def energy_pointing_game(cams, boxes=None, masks=None) -> np.ndarray:
    """(N,) float: sum of the map inside the object / sum of the whole map (maps must be >= 0; 0 for an all-zero
    map)."""
    cams = _maps(cams)
    if np.any(cams < 0):
        raise InputError("energy_pointing_game needs nonnegative maps (as CAM outputs are); apply a ReLU first")
    objects = object_masks(cams.shape, boxes, masks)
    total = cams.reshape(len(cams), -1).sum(axis=1, dtype=np.float64)
    inside = (cams * objects).reshape(len(cams), -1).sum(axis=1, dtype=np.float64)
    return np.divide(inside, total, out=np.zeros_like(total), where=total > 0)


def _maps(cams) -> np.ndarray:
    cams = np.asarray(_numpy(cams), np.float32)
    if cams.ndim != 3:
        raise InputError(f"cams must be maps (N, H, W), not an array of shape {cams.shape}")
    if np.isnan(cams).any():
        raise InputError("cams hold NaN")
    return cams
