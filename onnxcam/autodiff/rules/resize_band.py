"""The gradient of an upsampling Resize along one axis as a strided depthwise convolution.

The Resize rule (shape._resize) measures each resized axis' matrix m (m[i, j]: the weight of input i in output j)
and multiplies the gradient by its transpose. For an upsampling by an integer factor k, each input row of m is
the same short band shifted by k per row, except near the borders, where the coordinate clamping piles weight
onto the edge: a segmenter's last 8x bilinear upsampling of (N, 21, 40, 40) to 320x320 is a 320x40 matrix whose
rows hold 16 nonzeros. The product with the dense matrix costs 21 * 320 * 320 * 40 multiply-adds (2.2 ms on one
thread, ~12% of an LRASPP inference); the band is a depthwise Conv with stride k (20x fewer multiply-adds; but
onnxruntime's unblocked depthwise kernel is slow, so the whole gradient of that Resize went from ~2.6 to ~1.5
ms), and the rows where m differs from the shifted band get the product of their differences with the few
border columns they read. Exact up to float32 summation order; the band and the differences are read off the
measured matrix, and a matrix that is not such a band (align_corners, non-integer factors, rounding that differs
between rows) keeps the dense product.
"""

from __future__ import annotations

import numpy as np

# Used only where the band is at most this fraction of the output axis, for factors of 4 and more from maps of
# 32 or more: below, the dense product is cheaper (one thread, the gradient of a Resize alone, band vs product:
# 21 maps of 40 px x8 2.9 vs 3.2 ms, 21 of 80 px x4 3.2 vs 3.8; 256 of 20 px x2 1.0 vs 0.7, 128 of 10 px x4 0.39
# vs 0.25, 64 of 40 px x2 0.79 vs 0.65).
_MAX_BAND_FRACTION = 0.25
_MIN_FACTOR, _MIN_SIZE = 4, 32


def banded(m: np.ndarray) -> tuple[np.ndarray, int, dict] | None:
    """(band, start, corrections) for m (size_in, size_out) when m is a k-strided band up to border rows, else None.

    band[u] is the weight of output i*k + start + u in input i, for every row i where that output exists;
    corrections {"left": (rows, cols, diff), "right": ...}: the first/last rows where m differs from the band, the
    contiguous output columns those differences read, and diff[cols, rows] = (m - banded)[rows, cols].T.
    """
    size_in, size_out = m.shape
    k = size_out // size_in
    if k < _MIN_FACTOR or k * size_in != size_out or size_in < _MIN_SIZE:
        return None
    middle = size_in // 2
    nonzero = np.flatnonzero(m[middle])
    if nonzero.size == 0:
        return None
    start, stop = int(nonzero[0]) - middle * k, int(nonzero[-1]) - middle * k + 1
    if stop - start > _MAX_BAND_FRACTION * size_out:
        return None
    band = m[middle, middle * k + start: middle * k + stop].copy()
    predicted = np.zeros_like(m)
    for i in range(size_in):
        lo, hi = i * k + start, i * k + stop
        cut_lo, cut_hi = max(lo, 0), min(hi, size_out)
        if cut_lo < cut_hi:
            predicted[i, cut_lo:cut_hi] = band[cut_lo - lo: cut_hi - lo]
    diff = m - predicted
    rows = [i for i in range(size_in) if np.any(diff[i])]
    left = [i for i in rows if i < middle]
    right = [i for i in rows if i >= middle]
    if left != list(range(len(left))) or right != list(range(size_in - len(right), size_in)):
        return None  # differences away from the borders: not a band
    corrections = {}
    for side, chosen in (("left", left), ("right", right)):
        if chosen:
            cols = np.flatnonzero(np.any(diff[chosen], axis=0))
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            if hi - lo > _MAX_BAND_FRACTION * size_out:
                return None
            corrections[side] = (chosen, (lo, hi), np.ascontiguousarray(diff[chosen][:, lo:hi].T))
    return band, start, corrections


def band_gradient(b, g, axis: int, channels: int, m: np.ndarray, found: tuple) -> object:
    """g (N, C, H, W; size_out along `axis`, 2 or 3) times m.T along that axis, with banded(m)'s `found`."""
    band, start, corrections = found
    size_in, size_out = m.shape
    k = size_out // size_in
    length = band.size
    # output i reads g[i*k + start + u]: pad `-start` before; after, what the last output reads past the end
    before = max(0, -start)
    skip = max(0, start)  # a band starting after i*k: drop the first `start` elements instead
    after = max(0, (size_in - 1) * k + start + length - size_out)
    g_in = g if not skip else b.slice(g, [skip], [size_out], [axis])
    kernel = [1, 1]
    kernel[axis - 2] = length
    strides = [1, 1]
    strides[axis - 2] = k
    pads = [0, 0, 0, 0]
    pads[axis - 2], pads[axis] = before, after
    weight = np.broadcast_to(band.astype(np.float32).reshape([1, 1] + kernel), [channels, 1] + kernel).copy()
    out = b.op("Conv", g_in, weight, group=channels, kernel_shape=kernel, strides=strides, pads=pads)
    if (size_out - skip + before + after - length) // k + 1 > size_in:  # the band ends before the last output
        out = b.slice(out, [0], [size_in], [axis])
    if not corrections:
        return out
    # the border rows' differences, added to those rows alone (the rows between are copied once, by the Concat)
    first = len(corrections["left"][0]) if "left" in corrections else 0
    last = size_in - (len(corrections["right"][0]) if "right" in corrections else 0)
    pieces = []
    for side, (start_row, stop_row) in (("left", (0, first)), ("middle", (first, last)), ("right", (last, size_in))):
        if start_row == stop_row:
            continue
        piece = b.slice(out, [start_row], [stop_row], [axis])
        if side in corrections:
            _, (lo, hi), diff = corrections[side]
            piece = b.op("Add", piece, b.axis_matmul(b.slice(g, [lo], [hi], [axis]), axis, 4, diff))
        pieces.append(piece)
    return b.op("Concat", *pieces, axis=axis)
