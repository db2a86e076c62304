"""onnxcam/image.py, preprocess.py and files.py: reading odd images, model inputs, overlays, atomic writes."""

from __future__ import annotations

import io
import json
import os
import stat
import threading

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcam import files, image, preprocess
from onnxcam.errors import ImageTooLargeError, InputError, ModelError

PIL = pytest.importorskip("PIL.Image")


def _write(path, bgr_or_gray):
    assert cv2.imwrite(str(path), bgr_or_gray)
    return path


# ---- reading -----------------------------------------------------------------------------------------------------
def test_reads_color_as_rgb(tmp_path):
    bgr = np.zeros((4, 6, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    rgb = image.read_image(_write(tmp_path / "b.png", bgr))
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 2] == 255).all() and (rgb[..., :2] == 0).all()


def test_gray_becomes_three_equal_channels(tmp_path):
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    rgb = image.read_image(_write(tmp_path / "g.png", gray))
    assert rgb.shape == (4, 6, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)


def test_16_bit_is_scaled_to_8_bit(tmp_path):
    img16 = np.full((3, 3, 3), 65535, np.uint16)
    img16[0, 0] = 257 * 100
    rgb = image.read_image(_write(tmp_path / "deep.png", img16))
    assert rgb.dtype == np.uint8
    assert rgb[1, 1, 0] == 255 and rgb[0, 0, 0] == 100


def test_rgba_is_composited_on_white(tmp_path):
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[0, 0] = (0, 0, 255, 255)  # opaque red
    bgra[1, 1] = (0, 0, 0, 0)      # fully transparent black -> white
    rgb = image.read_image(_write(tmp_path / "a.png", bgra))
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert tuple(rgb[1, 1]) == (255, 255, 255)


def test_exif_orientation_is_honoured(tmp_path):
    # A 20x10 (w x h) JPEG whose left half is black and right half white, tagged "rotate 90 CW to display".
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, 10:] = 255
    img = PIL.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    rgb = image.read_image(path)
    assert rgb.shape[:2] == (20, 10)  # displayed upright: taller than wide
    assert rgb[:8].mean() < 40 and rgb[12:].mean() > 215  # the black half is now on top


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"not an image at all", "not an image, or a format OpenCV cannot read"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "not an image, or a format OpenCV cannot read"),  # truncated PNG
])
def test_undecodable_images_raise_input_error(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match="cannot decode image .*bad.png") as err:
        image.read_image(path)
    assert message in str(err.value)


def test_missing_image(tmp_path):
    with pytest.raises(InputError, match="image not found"):
        image.read_image(tmp_path / "nope.jpg")


FORMATS = [("png", "PNG", {}), ("jpg", "JPEG", {}), ("bmp", "BMP", {}), ("gif", "GIF", {}),
           ("webp", "WEBP", {"lossless": True}), ("webp", "WEBP", {"quality": 80}), ("tif", "TIFF", {}),
           ("tif", "TIFF", {"compression": "tiff_lzw"}), ("ppm", "PPM", {})]


def _encoded(fmt: str, options: dict, alpha: bool = False) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (23, 37, 4 if alpha else 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.fromarray(arr).save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("ext, fmt, options", FORMATS + [("webp", "WEBP", {"alpha": True})])
def test_header_size_matches_the_decoded_image(ext, fmt, options):
    options = dict(options)
    data = np.frombuffer(_encoded(fmt, options, alpha=options.pop("alpha", False)), np.uint8)
    assert image.image_size(data) == (37, 23), (fmt, options)
    assert cv2.imdecode(data, cv2.IMREAD_UNCHANGED).shape[:2] == (23, 37)


@pytest.mark.parametrize("ext, fmt, options", FORMATS)
def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch, ext, fmt, options):
    path = tmp_path / f"big.{ext}"
    path.write_bytes(_encoded(fmt, options))
    assert image.read_image(path, max_pixels=37 * 23).shape == (23, 37, 3)

    def no_decoding(*args):
        raise AssertionError("decoded an image above the limit")

    monkeypatch.setattr(image, "_decode", no_decoding)
    with pytest.raises(ImageTooLargeError, match=r"big\.\w+ is 37x23 pixels \(0 megapixels\), above the limit of "
                                                 r"0\.00085 megapixels: not decoded"):
        image.read_image(path, max_pixels=37 * 23 - 1)


def test_non_regular_files_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it blocks until a writer comes: should that happen, one comes after a while
    guard = threading.Timer(30, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    guard.start()
    try:
        with pytest.raises(InputError, match="image path is a named pipe \\(FIFO\\), not a regular file"):
            image.read_image(fifo)
        with pytest.raises(InputError, match="labels file .*pipe.png is not a regular file"):
            preprocess.read_labels(fifo)
    finally:
        guard.cancel()
    with pytest.raises(InputError, match="image path is a folder"):
        image.read_image(tmp_path)


# ---- model inputs ------------------------------------------------------------------------------------------------
def test_to_input_normalizes_and_lays_out():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    pre = preprocess.Preprocess((4, 4), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = image.to_input(rgb, pre)
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], 1.0)
    np.testing.assert_allclose(x[1:], -1.0)
    nhwc = image.to_input(rgb, preprocess.Preprocess((4, 4), (0.5,) * 3, (0.5,) * 3, layout="nhwc", color="bgr"))
    assert nhwc.shape == (4, 4, 3)
    np.testing.assert_allclose(nhwc[..., 2], 1.0)  # red is the last channel in BGR
    gray = image.to_input(rgb, preprocess.Preprocess((4, 4), (0.0,), (1.0,), color="gray"))
    assert gray.shape == (1, 4, 4)


def test_lite0_metadata_gives_its_preprocessing():
    proto = onnx.load(os.path.join(os.path.dirname(image.__file__), "data", "efficientnet_lite0.onnx"),
                      load_external_data=False)
    pre = preprocess.resolve(proto)
    assert pre.size == (224, 224) and pre.layout == "nchw" and pre.color == "rgb"
    x = image.to_input(np.full((300, 400, 3), 255, np.uint8), pre)
    np.testing.assert_allclose(x, (255 - 127) / 128, rtol=1e-6)  # x = (pixel - 127) / 128
    assert len(preprocess.labels_from_metadata(proto)) == 1000


def _model(shape, meta=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    for k, v in (meta or {}).items():
        m.metadata_props.add(key=k, value=v)
    return m


def test_layout_is_detected_from_the_input_shape():
    assert preprocess.resolve(_model(["N", 3, 32, 32])).layout == "nchw"
    nhwc = preprocess.resolve(_model(["N", 32, 32, 3]))
    assert nhwc.layout == "nhwc" and nhwc.sources["layout"] == "model" and nhwc.size == (32, 32)
    assert preprocess.resolve(_model(["N", 1, 28, 28])).color == "gray"


def test_overrides_beat_metadata_and_defaults_are_imagenet():
    meta = {preprocess.PREPROCESS_KEY: json.dumps({"mean": [0.5] * 3, "std": [0.25] * 3})}
    pre = preprocess.resolve(_model(["N", 3, 32, 32], meta), std=(0.1, 0.2, 0.3), bgr=True)
    assert pre.mean == (0.5,) * 3 and pre.sources["mean"] == "metadata"
    assert pre.std == (0.1, 0.2, 0.3) and pre.sources["std"] == "option"
    assert pre.color == "bgr"
    plain = preprocess.resolve(_model(["N", 3, 32, 32]))
    assert plain.mean == preprocess.IMAGENET_MEAN and plain.sources["mean"] == "default"


def test_dynamic_size_needs_a_size_and_static_size_must_match():
    with pytest.raises(InputError, match=r"dynamic spatial size \(\?, 3, \?, \?\): give the size \(H, W\)$") as e:
        preprocess.resolve(_model([None, 3, None, None]))
    assert preprocess.resolve(_model([None, 3, None, None]), size=(64, 48)).size == (64, 48)
    assert e.value.option == "size"  # the CLI names its flag; the library message does not
    with pytest.raises(InputError, match="^size 64x64 does not match the model's input size 32x32"):
        preprocess.resolve(_model(["N", 3, 32, 32]), size=(64, 64))


def test_bad_metadata_is_a_model_error():
    with pytest.raises(ModelError, match="onnxcam.preprocess' is not valid JSON"):
        preprocess.resolve(_model(["N", 3, 8, 8], {preprocess.PREPROCESS_KEY: "{oops"}))
    with pytest.raises(ModelError, match="onnxcam.labels' must be a JSON list of strings"):
        preprocess.labels_from_metadata(_model(["N", 3, 8, 8], {preprocess.LABELS_KEY: "{}"}))


def test_read_labels_text_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("cat\ndog\n\n")
    (tmp_path / "b.json").write_text('["cat", "dog"]')
    assert preprocess.read_labels(tmp_path / "a.txt") == ["cat", "dog"]
    assert preprocess.read_labels(tmp_path / "b.json") == ["cat", "dog"]
    assert len(preprocess.imagenet_labels()) == 1000


# ---- pictures ----------------------------------------------------------------------------------------------------
def test_overlay_is_show_cam_on_image_at_the_original_resolution():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    mask = rng.random((7, 7)).astype(np.float32)
    out = image.overlay(rgb, mask)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    # pytorch-grad-cam 1.5.7 show_cam_on_image(img, mask, use_rgb=True), written out on the resized mask
    big = cv2.resize(mask, (50, 30))
    heat = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * big), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    cam = 0.5 * np.float32(heat) / 255 + 0.5 * np.float32(rgb) / 255
    np.testing.assert_array_equal(out, np.uint8(255 * cam / np.max(cam)))
    assert image.heatmap(mask, (50, 30)).shape == (30, 50, 3)


def test_overlay_makes_no_full_size_float_copies_of_the_image(monkeypatch):
    """Done in bands of rows: equal to the one-piece arithmetic, and the peak allocation stays well under one float32
    copy of a 6-megapixel image per 12 bytes a pixel (the one-piece blend made four: 48 bytes a pixel)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
    mask = rng.random((7, 7)).astype(np.float32)
    tracemalloc.start()
    try:
        out = image.overlay(rgb, mask)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / rgb[..., 0].size < 20
    heat = np.float32(image.colorize(image.resize_map(mask, (3000, 2000)))) / 255
    cam = 0.5 * heat + 0.5 * (np.float32(rgb) / 255)
    np.testing.assert_array_equal(out, np.uint8(255 * (cam / np.max(cam))))


def test_pictures_temporaries_are_bounded_by_the_band_not_the_image(monkeypatch):
    """Beyond the pictures themselves (at most the resized float32 map, 4 bytes a pixel, with the heatmap, 3 bytes),
    image.pictures allocates only band-sized temporaries: under 4 MB for a 6-megapixel image (they grew with the
    band: 29 MB here with bands of a megapixel, freed megabytes that stay mapped in the writer threads' malloc
    heap). The pictures equal those made in one band."""
    import tracemalloc

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
    mask = rng.random((7, 7)).astype(np.float32)
    tracemalloc.start()
    try:
        out, heat = image.pictures(rgb, mask)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - 7 * rgb[..., 0].size < 4 * 2**20
    monkeypatch.setattr(image, "_BAND_PIXELS", rgb[..., 0].size)
    one_band = image.pictures(rgb, mask)
    np.testing.assert_array_equal(out, one_band[0])
    np.testing.assert_array_equal(heat, one_band[1])


@pytest.mark.parametrize("weight", [0.5, 0.3])
def test_pictures_equal_the_float_blend_pixel_for_pixel(monkeypatch, weight):
    """image.pictures looks the blend up per (heat value, image value) pair: equal on every pixel to
    show_cam_on_image's float32 arithmetic, for random, uniform, black and white images and maps that are zero,
    above 1 or below 0, done in several bands of rows."""
    monkeypatch.setattr(image, "_BAND_PIXELS", 300)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), np.full((20, 31, 3), 77, np.uint8),
              np.zeros((9, 40, 3), np.uint8), np.full((25, 12, 3), 255, np.uint8)]
    masks = [rng.random((7, 7)).astype(np.float32), np.zeros((7, 7), np.float32),
             (rng.random((5, 9)) * 3 - 1).astype(np.float32), np.ones((2, 2), np.float32)]
    for rgb in images:
        for mask in masks:
            h, w = rgb.shape[:2]
            out, heat = image.pictures(rgb, mask, weight)
            big = cv2.resize(mask, (w, h))
            want_heat = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * np.clip(big, 0, 1)), cv2.COLORMAP_JET),
                                     cv2.COLOR_BGR2RGB)
            cam = (1 - weight) * (np.float32(want_heat) / 255) + weight * (np.float32(rgb) / 255)
            np.testing.assert_array_equal(heat, want_heat)
            np.testing.assert_array_equal(out, np.uint8(255 * (cam / np.float32(np.max(cam)))))
            np.testing.assert_array_equal(image.overlay(rgb, mask, weight), out)


@pytest.mark.parametrize("level", [None, 0, 1, 9])
def test_png_levels_decode_to_the_same_pixels(level):
    rgb = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    decoded = cv2.imdecode(np.frombuffer(image.encode_png(rgb, level), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded[..., ::-1], rgb)


def test_png_round_trip(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    files.atomic_write(path, image.encode_png(rgb))
    np.testing.assert_array_equal(image.read_image(path), rgb)


def test_side_by_side():
    a, b = np.zeros((10, 20, 3), np.uint8), np.zeros((20, 20, 3), np.uint8)
    assert image.side_by_side(a, b).shape == (10, 30, 3)


# ---- atomic writes -----------------------------------------------------------------------------------------------
def test_atomic_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "out" / "result.json"
    files.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def killed(src, dst):
        raise KeyboardInterrupt  # the run is stopped between writing the temp file and renaming it

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}  # the old file is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]  # no temp file left


def test_atomic_write_gives_the_usual_permissions_without_touching_the_umask(tmp_path, monkeypatch):
    """os.umask is process-wide: setting it to read it races with other threads. The kernel applies it instead."""
    def no_umask(*_):
        raise AssertionError("os.umask called")

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", no_umask)
        files.atomic_write(tmp_path / "a.png", b"x")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o640


def test_json_is_strict(tmp_path):
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
            files.write_json(tmp_path / "r.json", {"score": value})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("source, size", [((7, 7), (224, 224)), ((14, 9), (100, 61)), ((30, 40), (12, 9)),
                                          ((1, 1), (5, 3)), ((6, 6), (6, 6))])
def test_batched_map_resize_equals_cv2_on_each_map(source, size):
    """resize_maps (two matrix products) against cv2.resize of each map, the way pytorch-grad-cam resizes."""
    from onnxcam.image import resize_maps

    maps = np.random.default_rng(0).random((5, *source), dtype=np.float32)
    got = resize_maps(maps, size)
    assert got.shape == (5, size[1], size[0]) and got.dtype == np.float32
    for m, g in zip(maps, got):
        np.testing.assert_allclose(g, cv2.resize(m, size), rtol=0, atol=2e-7)
    assert (resize_maps(np.abs(maps), size) >= 0).all()  # nonnegative weights: aggregate_layers relies on it
