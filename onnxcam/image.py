"""Images: reading, preprocessing into model inputs, resizing maps, and overlays. The only cv2 importer."""

from __future__ import annotations

import functools
import os
import re
import stat
import struct
from pathlib import Path

import cv2
import numpy as np

from . import png
from .errors import ImageTooLargeError, InputError
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
# Images above this many pixels are refused before decoding (a 1 MB PNG can claim 20000 x 20000 pixels: 1.2 GB
# decoded, several times that in float copies). 100 megapixels is well above any camera photo.
MAX_PIXELS = 100_000_000
# Overlays and heatmaps are computed this many pixels at a time. Small on purpose: the writer threads interleave the
# bands' temporaries with the full-size pictures, and freed megabyte-sized temporaries stay mapped in the malloc heap
# between long-lived arrays (peak RSS of `onnxcam explain` on tools/bench_memory.py's 64 photos, up to 1280x854:
# 451-466 MB with bands of 1<<20 pixels, 415-419 MB with 1<<17), while 128K pixels of each (a few hundred KB) stay
# in the CPU's cache: no slower.
_BAND_PIXELS = 1 << 17
_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                (stat.S_ISBLK, "a device"))


def quiet_decoder_warnings() -> None:
    """Silence OpenCV's own warning lines (a truncated PNG's "buffer is incomplete"): the command line reports every
    unreadable image in one line of its own. Process-wide, so only the command line calls it."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def read_image(path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3) at its original resolution.

    EXIF orientation is applied; gray becomes 3 equal channels; 16-bit and float images are scaled to 8 bits;
    transparent pixels are composited on white (images with an alpha channel are read as stored, since the
    formats that carry alpha rarely carry an EXIF orientation).

    max_pixels: images with more pixels raise ImageTooLargeError; the size is read from the file's header before
    decoding (PNG, JPEG, GIF, BMP, WebP, TIFF, PNM), for other formats checked after decoding. None: no limit.
    Only regular files are read (a named pipe would block forever).
    """
    path = Path(path)
    data = _read_regular_file(path)
    if data.size == 0:
        raise InputError(f"cannot decode image {path}: the file is empty")
    if max_pixels is not None:
        _check_pixels(path, image_size(data), max_pixels)
    img = None
    if path.suffix.lower() in _MAY_HAVE_ALPHA:
        raw = _decode(data, cv2.IMREAD_UNCHANGED)
        if raw is not None and raw.ndim == 3 and raw.shape[2] in (2, 4):
            img = _composite_on_white(raw)
    if img is None:
        img = _decode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)  # applies the EXIF orientation
    if img is None:
        raise InputError(f"cannot decode image {path}: not an image, or a format OpenCV cannot read")
    if max_pixels is not None:  # formats whose header is not read above
        _check_pixels(path, (img.shape[1], img.shape[0]), max_pixels)
    return cv2.cvtColor(_to_uint8(img), cv2.COLOR_BGR2RGB)


def _read_regular_file(path: Path) -> np.ndarray:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode):
        raise InputError(f"image path is a folder: {path}")
    for test, kind in _NOT_REGULAR:
        if test(mode):
            raise InputError(f"image path is {kind}, not a regular file: {path}")
    try:
        return np.fromfile(path, dtype=np.uint8)  # not cv2.imread: it returns None for every kind of failure
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc


def _check_pixels(path: Path, size_wh: tuple[int, int] | None, max_pixels: int) -> None:
    if size_wh is None or size_wh[0] * size_wh[1] <= max_pixels:
        return
    w, h = size_wh
    raise ImageTooLargeError(f"image {path} is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels), above the limit of "
                             f"{max_pixels / 1e6:g} megapixels: not decoded")


def image_size(data) -> tuple[int, int] | None:
    """(width, height) from an image file's header, without decoding it; None for formats not read here.

    PNG, JPEG, GIF, BMP, WebP, TIFF (the first image) and PNM/PFM. A malformed header gives None: the decoder
    then says what is wrong."""
    head = bytes(data[:64])
    try:
        for magic, reader in _HEADER_READERS:
            if head.startswith(magic):
                return reader(data)
    except (struct.error, ValueError, IndexError):
        return None
    return None


def _png_size(data) -> tuple[int, int] | None:
    if bytes(data[12:16]) != b"IHDR":
        return None
    return struct.unpack(">II", bytes(data[16:24]))


def _jpeg_size(data) -> tuple[int, int] | None:
    """Walk the markers to the first start-of-frame (SOF0..SOF15 except DHT, JPG and DAC)."""
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = int(data[i + 1])
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", bytes(data[i + 5:i + 9]))
            return w, h
        if marker == 0xDA:  # start of scan before any frame header: not a JPEG we can size
            return None
        i += 2 + struct.unpack(">H", bytes(data[i + 2:i + 4]))[0]
    return None


def _gif_size(data) -> tuple[int, int]:
    return struct.unpack("<HH", bytes(data[6:10]))


def _bmp_size(data) -> tuple[int, int]:
    if struct.unpack("<I", bytes(data[14:18]))[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", bytes(data[18:22]))
    w, h = struct.unpack("<ii", bytes(data[18:26]))
    return abs(w), abs(h)  # a negative height means top-down rows


def _webp_size(data) -> tuple[int, int] | None:
    if bytes(data[8:12]) != b"WEBP":
        return None
    chunk = bytes(data[12:16])
    if chunk == b"VP8 " and bytes(data[23:26]) == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", bytes(data[26:30]))
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = struct.unpack("<I", bytes(data[21:25]))[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        b = bytes(data[24:30])
        return 1 + int.from_bytes(b[:3], "little"), 1 + int.from_bytes(b[3:], "little")
    return None


def _tiff_size(data) -> tuple[int, int] | None:
    order = "<" if bytes(data[:2]) == b"II" else ">"
    start = struct.unpack(order + "I", bytes(data[4:8]))[0]
    count = struct.unpack(order + "H", bytes(data[start:start + 2]))[0]
    found = {}
    for k in range(count):
        entry = bytes(data[start + 2 + 12 * k:start + 14 + 12 * k])
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), entry[8:10] if kind == 3 else entry[8:])[0]
    return (found[256], found[257]) if len(found) == 2 else None


def _pnm_size(data) -> tuple[int, int] | None:
    text = re.sub(rb"#[^\n]*", b" ", bytes(data[2:512]))
    fields = text.split()
    return (int(fields[0]), int(fields[1])) if len(fields) >= 2 else None


_HEADER_READERS = (
    (b"\x89PNG\r\n\x1a\n", _png_size), (b"\xff\xd8", _jpeg_size), (b"GIF87a", _gif_size), (b"GIF89a", _gif_size),
    (b"BM", _bmp_size), (b"RIFF", _webp_size), (b"II*\x00", _tiff_size), (b"MM\x00*", _tiff_size),
    *((f"P{k}".encode(), _pnm_size) for k in "123456"), (b"PF", _pnm_size), (b"Pf", _pnm_size),
)


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
    """The map alone, resized to (width, height) and colorized (in bands of rows: no full-size float copies
    beyond the resized map itself)."""
    return _colorized(resize_map(mask, size_wh))


def overlay(rgb: np.ndarray, mask: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """show_cam_on_image(rgb / 255, mask, use_rgb=True) at the image's own resolution (the map is resized to it).

    Heatmap and image blended (1 - image_weight) : image_weight, divided by the maximum, as uint8 RGB (see
    pictures: the same float32 arithmetic, looked up per pair of values instead of done per pixel).
    """
    return pictures(rgb, mask, image_weight)[0]


def pictures(rgb: np.ndarray, mask: np.ndarray, image_weight: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(overlay(rgb, mask, image_weight), heatmap(mask, image size)) from one resize and one colormap.

    The blend of show_cam_on_image, in float32, is (1 - w) * heat / 255 + w * rgb / 255, divided by its largest
    value over the picture, times 255, truncated to uint8. Each channel's result depends only on the pair (heat
    value, image value) and on that largest value, so it is computed once for each of the 256 x 256 pairs with the
    very same float32 operations, and the picture is a table lookup: equal pixel for pixel, several times faster.
    Done in bands of rows: a huge image gets no full-size copies beyond the resized map and the two pictures."""
    h, w = rgb.shape[:2]
    heat = _colorized(resize_map(mask, (w, h)))
    blend = _blend_table(float(image_weight))
    bands = _bands(h, w)
    seen = np.zeros(256 * 256, bool)
    for b in bands:
        seen |= np.bincount(_pairs(heat[b], rgb[b]).ravel(), minlength=seen.size) > 0
    top = np.max(blend.ravel()[seen])
    table = np.uint8(255 * (blend / np.float32(top))).ravel()
    out = np.empty_like(rgb, dtype=np.uint8)
    for b in bands:
        np.take(table, _pairs(heat[b], rgb[b]), out=out[b])
    return out, heat


def _colorized(big: np.ndarray) -> np.ndarray:
    """colorize of a full-size map, in bands of rows."""
    out = np.empty((*big.shape, 3), np.uint8)
    for band in _bands(*big.shape):
        out[band] = colorize(big[band])
    return out


def _pairs(heat: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """heat * 256 + rgb, per channel: the index of each (heat value, image value) pair in a 256 x 256 table
    (computed in place: one band-sized array, not three)."""
    pairs = heat.astype(np.uint16)
    pairs <<= 8
    pairs |= rgb
    return pairs


@functools.lru_cache(maxsize=8)
def _blend_table(image_weight: float) -> np.ndarray:
    """(256, 256) float32: [heat value, image value] -> the blend, with overlay's float32 operations."""
    values = np.arange(256, dtype=np.float32)
    heat, img = values[:, None] / 255, values[None, :] / 255
    table = (1 - image_weight) * heat + image_weight * img
    table.flags.writeable = False
    return table


def _bands(h: int, w: int) -> list[slice]:
    """Row ranges of about a megapixel each."""
    rows = max(1, _BAND_PIXELS // max(w, 1))
    return [slice(r, r + rows) for r in range(0, h, rows)]


def side_by_side(left: np.ndarray, right: np.ndarray, height: int | None = None) -> np.ndarray:
    """Two RGB images scaled to one height and put next to each other (a picture holding two objects)."""
    height = height or min(left.shape[0], right.shape[0])

    def fit(img):
        w = max(1, round(img.shape[1] * height / img.shape[0]))
        return cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA)

    return np.concatenate([fit(left), fit(right)], axis=1)


def caption(picture: np.ndarray, lines: list[str] | list[list[str]]) -> np.ndarray:
    """The uint8 RGB picture with a white band of black text above it; the picture's own pixels are kept as they are.

    lines: the lines of one caption (["tabby cat 0.83", "gradcam @ layer4"]), or one list of lines per column: the
    band is then cut into len(lines) equal cells (the labels of the panels of a side-by-side picture). A line too
    wide for its cell is cut and ends in "~"."""
    picture = np.asarray(picture)
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
        raise InputError(f"a caption goes on a uint8 RGB picture (H, W, 3), not {picture.dtype} {picture.shape}")
    columns = [lines] if all(isinstance(x, str) for x in lines) else lines
    scale, line_h = 0.42, 15
    cell = picture.shape[1] // max(1, len(columns))
    strip = np.full((line_h * max(map(len, columns), default=0) + 6, picture.shape[1], 3), 255, np.uint8)
    for c, column in enumerate(columns):
        for i, text in enumerate(column):
            cv2.putText(strip, _fit(str(text), cell - 6, scale), (c * cell + 4, line_h * (i + 1)),
                        cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, picture], axis=0)


def _fit(text: str, width: int, scale: float) -> str:
    """The text, cut and ended with "~" where it is wider than `width` pixels (cv2's Hershey font is ASCII only:
    other characters are drawn as "?")."""
    text = text.encode("ascii", "replace").decode("ascii")

    def wide(t: str) -> int:
        return cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]

    if wide(text) <= width:
        return text
    while len(text) > 1 and wide(text + "~") > width:
        text = text[:-1]
    return text + "~"


def encode_png(rgb: np.ndarray, level: int | None = None) -> bytes:
    """uint8 RGB (H, W, 3) -> PNG bytes (onnxcam/png.py). level: zlib's compression level 0-9 (0: stored, fastest,
    largest); None: level 1 with run-length matching (fast, small for overlays). The pixels decode the same
    whatever the level."""
    try:
        return png.encode(rgb, level)
    except ValueError as exc:
        raise InputError(str(exc)) from exc


# ---- detections and masks (onnxcam/tasks) ----------------------------------------------------------------------
def _palette(i: int) -> tuple[int, int, int]:
    """A distinct bright RGB colour per class index."""
    hue = int(i * 47) % 180
    bgr = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[2]), int(bgr[1]), int(bgr[0])


def draw_boxes(rgb: np.ndarray, boxes, texts: list[str], classes: list[int]) -> np.ndarray:
    """A copy of the uint8 RGB image with each (x1, y1, x2, y2) box (image pixels) drawn and labelled."""
    out = np.ascontiguousarray(rgb).copy()
    thick = max(1, round(max(out.shape[:2]) / 300))
    for (x1, y1, x2, y2), text, c in zip(boxes, texts, classes):
        colour = _palette(c)
        p1, p2 = (round(x1), round(y1)), (round(x2), round(y2))
        cv2.rectangle(out, p1, p2, colour, thick, cv2.LINE_AA)
        text = text.encode("ascii", "replace").decode("ascii")
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, 1)
        top = max(p1[1], th + 4)
        cv2.rectangle(out, (p1[0], top - th - 4), (p1[0] + tw + 4, top), colour, -1)
        cv2.putText(out, text, (p1[0] + 2, top - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return out


def draw_outline(rgb: np.ndarray, mask: np.ndarray, c: int = 0, text: str | None = None) -> np.ndarray:
    """A copy of the uint8 RGB image with the outline of a (h, w) mask (resized to the image) drawn in class c's
    colour, and `text` at its top-left."""
    out = np.ascontiguousarray(rgb).copy()
    h, w = out.shape[:2]
    big = cv2.resize(np.uint8(np.asarray(mask) > 0.5) * 255, (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thick = max(1, round(max(h, w) / 300))
    cv2.drawContours(out, contours, -1, _palette(c), thick, cv2.LINE_AA)
    if text:
        cv2.putText(out, text.encode("ascii", "replace").decode("ascii"), (4, 14 * thick),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45 * thick, _palette(c), 1, cv2.LINE_AA)
    return out
