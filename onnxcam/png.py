"""PNG encoding of uint8 RGB pictures: rows filtered by PNG's "Up" filter, deflated by zlib-ng.

A folder run writes an overlay per image: encoding it was the largest cost left after the model (OpenCV's encoder,
through libpng and the system zlib: 5.5 ms for a 640x427 overlay on this project's 2-core machine). zlib-ng does the
same deflate 2-3x faster (tools/bench_folder.py). With the Up filter (each byte minus the one above it) and
run-length matching, overlays come out as small as OpenCV's (its default: level 1, RLE) in 2.5 ms. Where zlib-ng is
not installed, Python's zlib gives the same bytes' worth of PNG at about OpenCV's speed.
"""

from __future__ import annotations

import struct

import numpy as np

try:
    from zlib_ng import zlib_ng as zlib
except ImportError:  # an optional speed-up: the same format from Python's own zlib
    import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UP = 2  # PNG filter type: the difference with the row above (the first row: with a row of zeros)
_BAND_BYTES = 1 << 20  # rows are filtered and deflated about this many bytes at a time: no full-size copy


def encode(rgb: np.ndarray, level: int | None = None, codec=zlib) -> bytes:
    """uint8 RGB (H, W, 3) -> PNG bytes (8-bit truecolor, no interlace). level: zlib's level 0-9 (0: stored);
    None: level 1 with run-length matching (fast; about OpenCV's default size). codec: a zlib-like module."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"a PNG is encoded from uint8 RGB (H, W, 3) with H, W > 0, not {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    strategy = codec.Z_RLE if level is None else codec.Z_DEFAULT_STRATEGY
    deflate = codec.compressobj(1 if level is None else int(level), codec.DEFLATED, 15, 9, strategy)
    flat = rgb.reshape(h, w * 3)
    rows_per_band = max(1, _BAND_BYTES // (w * 3 + 1))
    parts = []
    for top in range(0, h, rows_per_band):
        band = flat[top:top + rows_per_band]
        above = flat[top - 1:top + len(band) - 1] if top else None
        parts.append(deflate.compress(_filtered_up(band, above)))
    parts.append(deflate.flush())
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits per sample, truecolor, deflate, no interlace
    # The IDAT chunk is written around the deflated parts: one copy of the compressed data, in the final join.
    crc = codec.crc32(b"IDAT")
    for part in parts:
        crc = codec.crc32(part, crc)
    return b"".join([SIGNATURE, _chunk(b"IHDR", header, codec), struct.pack(">I", sum(map(len, parts))), b"IDAT",
                     *parts, struct.pack(">I", crc), _chunk(b"IEND", b"", codec)])


def _filtered_up(band: np.ndarray, above: np.ndarray | None) -> np.ndarray:
    """The band's rows, each led by its filter type byte, minus the row above (modulo 256; none above row 0)."""
    rows = np.empty((len(band), band.shape[1] + 1), np.uint8)
    rows[:, 0] = _UP
    if above is None:
        rows[0, 1:] = band[0]
        np.subtract(band[1:], band[:-1], out=rows[1:, 1:])
    else:
        np.subtract(band, above, out=rows[:, 1:])
    return rows


def _chunk(kind: bytes, data: bytes, codec) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", codec.crc32(data, codec.crc32(kind)))
