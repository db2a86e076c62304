"""How images become model inputs: every decision (size, mean/std, layout, color order) in one small dataclass.

Values come, in order of priority, from explicit overrides (the command line), the model's own metadata_props,
and the model's declared input shape; what is still open falls back to the ImageNet convention. Metadata keys:

    onnxcam.preprocess  JSON object, every field optional:
                        {"size": [H, W], "mean": [r, g, b], "std": [r, g, b],   (mean/std in [0, 1] pixel units)
                         "layout": "nchw" | "nhwc", "color": "rgb" | "bgr" | "gray", "resize": "stretch"}
    onnxcam.labels      JSON list of class names, index = class id

The input is computed as ((pixel / 255) - mean) / std on the image resized ("stretched") to H x W.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from .errors import InputError, ModelError
from .graph import inputs

PREPROCESS_KEY = "onnxcam.preprocess"
LABELS_KEY = "onnxcam.labels"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("nchw", "nhwc")
COLORS = ("rgb", "bgr", "gray")
RESIZES = ("stretch",)


@dataclass(frozen=True)
class Preprocess:
    """What one model wants: x = ((pixel / 255) - mean) / std, resized to size, in layout and color order."""

    size: tuple[int, int]                 # (H, W) of the model input
    mean: tuple[float, ...]               # per channel, [0, 1] units
    std: tuple[float, ...]
    layout: str = "nchw"                  # "nchw" or "nhwc"
    color: str = "rgb"                    # "rgb", "bgr" or "gray" (a 1-channel model)
    resize: str = "stretch"
    sources: dict = field(default_factory=dict, compare=False)  # field -> "option" | "metadata" | "model" | "default"

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    def input_shape(self, batch: int = 1) -> tuple[int, ...]:
        h, w = self.size
        return (batch, self.channels, h, w) if self.layout == "nchw" else (batch, h, w, self.channels)

    def describe(self) -> dict:
        """A JSON-able record of the preprocessing and where each value came from."""
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d


def metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def model_input(proto: onnx.ModelProto) -> tuple[str, tuple | None]:
    """The first real input's name and declared shape (None for dynamic dims; shape None if undeclared)."""
    inp = inputs.model_input(proto)
    return inp.name, inputs.declared_shape(inp)


def detect_layout(shape: tuple | None) -> str | None:
    """'nchw' or 'nhwc' from a declared 4-D input shape, None when it cannot tell (e.g. all dims dynamic)."""
    if shape is None or len(shape) != 4:
        return None
    c_first, c_last = shape[1], shape[3]
    first, last = c_first in (1, 3, 4), c_last in (1, 3, 4)
    if first and not last:
        return "nchw"
    if last and not first:
        return "nhwc"
    if first and last:  # e.g. (N, 3, 224, 3): prefer the channel count a photo has
        return "nchw" if c_first == 3 else "nhwc"
    return None


def resolve(proto: onnx.ModelProto, *, size: tuple[int, int] | None = None, mean=None, std=None,
            layout: str = "auto", bgr: bool = False, assumed_size: tuple[int, int] | None = None) -> Preprocess:
    """The preprocessing for `proto`: overrides > metadata_props > the input shape > ImageNet defaults.

    assumed_size: used (source "assumed") when the spatial size is dynamic and neither given nor in the metadata;
    without it that case raises InputError."""
    meta = _read_preprocess_metadata(proto)
    name, shape = model_input(proto)
    sources: dict[str, str] = {}
    if shape is not None and len(shape) != 4:
        raise ModelError(f"input {name!r} has shape {_fmt(shape)}; onnxcam explains image models with a 4-D "
                         "input (N, C, H, W) or (N, H, W, C)")

    if layout not in ("auto",) + LAYOUTS:
        raise InputError(f"layout must be auto, nchw or nhwc, not {layout!r}")
    if layout != "auto":
        sources["layout"] = "option"
    elif "layout" in meta:
        layout, sources["layout"] = meta["layout"], "metadata"
    elif (found := detect_layout(shape)) is not None:
        layout, sources["layout"] = found, "model"
    else:
        layout, sources["layout"] = "nchw", "default"

    declared_c = None
    declared_hw: tuple = (None, None)
    if shape is not None:
        declared_c = shape[1] if layout == "nchw" else shape[3]
        declared_hw = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
    if declared_c is not None and declared_c not in (1, 3):
        raise ModelError(f"input {name!r} has shape {_fmt(shape)}: with layout {layout} that is {declared_c} "
                         "channels; onnxcam feeds 1 (gray) or 3 (color) channels (try the other layout)", option="layout")

    color = meta.get("color", "rgb")
    sources["color"] = "metadata" if "color" in meta else "default"
    if declared_c == 1:
        color, sources["color"] = "gray", "model"
    elif color == "gray" and declared_c == 3:
        raise ModelError(f"metadata says color 'gray' but input {name!r} has 3 channels")
    if bgr:
        if color == "gray":
            raise InputError("bgr makes no sense for a 1-channel (gray) model", option="bgr")
        color, sources["color"] = "bgr", "option"

    static_hw = tuple(declared_hw) if all(isinstance(d, int) and d > 0 for d in declared_hw) else None
    if size is not None:
        size = _check_size(size)
        if static_hw is not None and size != static_hw:
            raise InputError(f"size {size[0]}x{size[1]} does not match the model's input size "
                             f"{static_hw[0]}x{static_hw[1]} (input {name!r}, shape {_fmt(shape)})", option="size")
        sources["size"] = "option"
    elif static_hw is not None:
        size, sources["size"] = static_hw, "model"
    elif "size" in meta:
        size, sources["size"] = tuple(meta["size"]), "metadata"
    elif assumed_size is not None:
        size, sources["size"] = _check_size(assumed_size), "assumed"
    else:
        raise InputError(f"input {name!r} has a dynamic spatial size {_fmt(shape)}: give the size (H, W)",
                         option="size")

    n = 1 if color == "gray" else 3
    mean, sources["mean"] = _channels("mean", mean, meta, n, IMAGENET_MEAN)
    std, sources["std"] = _channels("std", std, meta, n, IMAGENET_STD)
    if any(not s > 0 for s in std):
        raise InputError(f"std must be positive, got {list(std)}")
    resize = meta.get("resize", "stretch")
    if resize not in RESIZES:
        raise ModelError(f"metadata {PREPROCESS_KEY!r} asks for resize {resize!r}; supported: {', '.join(RESIZES)}")
    return Preprocess(size, mean, std, layout, color, resize, sources)


def labels_from_metadata(proto: onnx.ModelProto) -> list[str] | None:
    raw = metadata(proto).get(LABELS_KEY)
    if raw is None:
        return None
    try:
        labels = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelError(f"metadata {LABELS_KEY!r} is not valid JSON: {exc}") from exc
    if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
        raise ModelError(f"metadata {LABELS_KEY!r} must be a JSON list of strings")
    return labels


def read_labels(path) -> list[str]:
    """Class names from a file: a JSON list, or one name per line (blank lines at the end ignored)."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a named pipe would block the read forever
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise InputError(f"labels file {path} is {kind}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"labels file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the labels file {path}: {exc}") from exc
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"labels file {path} looks like JSON but does not parse: {exc}") from exc
        if not isinstance(labels, list):
            raise InputError(f"labels file {path} must hold a JSON list of names")
        return [str(s) for s in labels]
    labels = text.splitlines()
    while labels and not labels[-1].strip():
        labels.pop()
    if not labels:
        raise InputError(f"labels file {path} is empty")
    return [s.strip() for s in labels]


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names bundled with onnxcam."""
    return read_labels(Path(__file__).parent / "data" / "imagenet_classes.txt")


def _read_preprocess_metadata(proto: onnx.ModelProto) -> dict:
    raw = metadata(proto).get(PREPROCESS_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelError(f"metadata {PREPROCESS_KEY!r} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelError(f"metadata {PREPROCESS_KEY!r} must be a JSON object, got {raw[:80]!r}")
    if meta.get("layout", "nchw") not in LAYOUTS:
        raise ModelError(f"metadata {PREPROCESS_KEY!r}: layout must be one of {LAYOUTS}, not {meta['layout']!r}")
    if meta.get("color", "rgb") not in COLORS:
        raise ModelError(f"metadata {PREPROCESS_KEY!r}: color must be one of {COLORS}, not {meta['color']!r}")
    if "size" in meta:
        size = meta["size"]
        if not (_numbers(size) and len(size) == 2 and all(float(v).is_integer() and v >= 1 for v in size)):
            raise ModelError(f"metadata {PREPROCESS_KEY!r}: size must be [H, W], two positive integers, not {size!r}")
        meta["size"] = [int(v) for v in size]
    for what in ("mean", "std"):
        if what in meta and not (_numbers(meta[what]) and len(meta[what]) in (1, 3)
                                 and all(math.isfinite(v) for v in meta[what])):
            raise ModelError(f"metadata {PREPROCESS_KEY!r}: {what} must be a list of 3 numbers (r, g, b) or 1 for "
                             f"all channels, in [0, 1] pixel units; got {meta[what]!r}")
    if "std" in meta and any(v <= 0 for v in meta["std"]):
        raise ModelError(f"metadata {PREPROCESS_KEY!r}: std must be positive, got {meta['std']!r}")
    return meta


def _numbers(value) -> bool:
    """A JSON list of numbers (true and false are not numbers here)."""
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _check_size(size) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise InputError(f"size must be two integers [H, W], not {size!r}") from None
    if h < 1 or w < 1:
        raise InputError(f"size must be positive, not {h}x{w}")
    return h, w


def _channels(what: str, given, meta: dict, n: int, default: tuple) -> tuple[tuple[float, ...], str]:
    if given is not None:
        values, source = tuple(float(v) for v in given), "option"
    elif what in meta:
        values, source = tuple(float(v) for v in meta[what]), "metadata"
    else:
        values, source = (default if n == 3 else (sum(default) / 3,)), "default"
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        if source == "metadata":
            raise ModelError(f"metadata {PREPROCESS_KEY!r}: {what} has {len(values)} values {list(values)} for a "
                             f"{n}-channel input; give {n} or 1")
        raise InputError(f"{what} needs {n} value(s) for a {n}-channel input, got {list(values)}")
    return values, source


def _fmt(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
