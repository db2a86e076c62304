"""onnxcam/png.py against an independent decoder (OpenCV's libpng, which also checks every chunk's CRC)."""

import zlib

import cv2
import numpy as np
import pytest

from onnxcam import SAMPLE_IMAGES, image, png
from onnxcam.errors import InputError


def _decoded(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert bgr is not None, "libpng refused the PNG"
    return bgr[..., ::-1]


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (23, 1), (40, 31), (301, 7)])
@pytest.mark.parametrize("level", [None, 0, 1, 6, 9])
def test_png_decodes_to_the_same_pixels(shape, level):
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decoded(png.encode(rgb, level)), rgb)


def test_png_bands_join_seamlessly(monkeypatch):
    """Rows are filtered band by band: each band's first row is filtered against the last row of the band before."""
    monkeypatch.setattr(png, "_BAND_BYTES", 100)  # 3 rows of 30 pixels per band
    rgb = np.random.default_rng(0).integers(0, 256, (50, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decoded(png.encode(rgb)), rgb)


def test_png_with_pythons_zlib_is_the_same_picture():
    """Without zlib-ng the same format comes from Python's zlib: same pixels, same filtered rows."""
    rgb = image.read_image(SAMPLE_IMAGES[0])
    fast, plain = png.encode(rgb), png.encode(rgb, codec=zlib)
    np.testing.assert_array_equal(_decoded(plain), rgb)
    np.testing.assert_array_equal(_decoded(fast), rgb)
    assert _idat(fast) == _idat(plain)


def _idat(data: bytes) -> bytes:
    """The inflated image data (the filtered rows) of a PNG with one IDAT chunk."""
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8:start - 4], "big")
    return zlib.decompress(data[start:start + length])


def test_png_of_a_photo_is_no_larger_than_opencvs():
    """The default (level 1, run-length matching, Up filter) keeps OpenCV's default size for a photo overlay."""
    rgb = image.read_image(SAMPLE_IMAGES[0])
    mask = cv2.resize(np.random.default_rng(0).random((7, 7)).astype(np.float32), (7, 7))
    picture = image.overlay(rgb, mask)
    ours = len(png.encode(picture))
    opencv = len(cv2.imencode(".png", picture[..., ::-1])[1])
    assert ours <= 1.1 * opencv, (ours, opencv)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)])
def test_png_refuses_what_is_not_an_rgb_picture(bad):
    with pytest.raises(InputError, match="uint8 RGB"):
        image.encode_png(bad)
