"""Explaining image files: find them, preprocess, run the CAM methods, write pictures and one JSON per image.

The command line (cli.py) is a thin shell around `Runner`; this module neither prints nor exits.
Files written per image (base = the image's name without its extension, kept unique in its output folder;
with layers chosen by name, base is followed by .<layer tag> (layer_tag), so runs on other layers never replace
these files; class-agnostic methods (EigenCAM, KPCA-CAM) have no .<class>: their map is written once):

    <base>.<method>.<class>.overlay.png   the heatmap blended on the image, at the image's original resolution
    <base>.<method>.<class>.heatmap.png   the heatmap alone, same resolution
    <base>.<method>.<class>.npz           with save_raw: maps, activations, gradients, logits
    <base>.json                           predictions, targets, layers, model hash, preprocessing, timings

A map that is zero everywhere (e.g. the target's gradient at the layer is zero) gets no pictures: its JSON entry
says why in "zero_map". The JSON is written last, so its presence means the image's pictures are complete; it is
strict JSON (an image whose logits, activations or gradients are not finite fails instead).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, image, preprocess
from .autodiff.rules.qlinear import is_quantized
from .cam.api import CLASS_AGNOSTIC, REGISTRY, Explanation, canonical, explanation, method_object
from .errors import InputError, NumericalError
from .explainer import Explainer
from .files import atomic_write, write_json, write_npz
from .graph.load import load_model
from .graph.model import ModelGraph
from .modelinfo import check_input_size

log = logging.getLogger(__name__)
TOP_K = 5
# CLASS_AGNOSTIC (from the method registry, onnxcam.cam.api.REGISTRY): methods whose map is the same for every
# class, written once.


# ---- what to explain -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """'top' with k: each image's k best classes; 'classes': the same given classes for every image."""

    kind: str
    k: int = 1
    classes: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"top{self.k}" if self.kind == "top" else ",".join(str(c) for c in self.classes)


def parse_target(spec: str, labels: list[str] | None = None) -> Target:
    """'top1', 'top3', '285', '285,967' or class names ('Egyptian cat,espresso', case-insensitive)."""
    spec = spec.strip()
    if m := re.fullmatch(r"top(\d+)", spec, re.IGNORECASE):
        k = int(m.group(1))
        if k < 1:
            raise InputError(f"target {spec!r}: k must be at least 1")
        return Target("top", k=k)
    classes = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise InputError(f"target {spec!r} has an empty class")
        if re.fullmatch(r"\d+", part):
            classes.append(int(part))
            continue
        hits = [i for i, name in enumerate(labels or []) if name.lower() == part.lower()]
        if not hits:
            known = "" if labels else " (the model has no class names: give class numbers)"
            raise InputError(f"target {part!r} is neither topK, a class number nor a class name{known}")
        if len(hits) > 1:
            raise InputError(f"class name {part!r} is ambiguous: classes {hits}; give the number")
        classes.append(hits[0])
    return Target("classes", classes=tuple(dict.fromkeys(classes)))


# ---- which files -----------------------------------------------------------------------------------------------
@dataclass
class ImageFile:
    path: Path                      # where it is read from (for display and the JSON)
    base: Path                      # output path without suffix, relative to the output folder
    rgb: np.ndarray | None = None   # already decoded (the demo's composed picture), else read from path


def find_images(inputs, exclude=()) -> list[ImageFile]:
    """Files as given, folders recursed (image extensions only, hidden entries and `exclude` folders skipped)."""
    skip = {_real(p) for p in exclude}
    found: list[tuple[Path, Path]] = []
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            files = []
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if any(part.startswith(".") for part in rel.parts) or any(s in _real(f).parents for s in skip):
                    continue
                if f.is_file() and f.suffix.lower() in image.IMAGE_EXTENSIONS:
                    files.append((f, rel.with_suffix("")))
            if not files:
                raise InputError(f"no images found in folder {p}")
            found += files
        elif p.exists():
            found.append((p, Path(p.stem)))
        elif p.is_symlink():
            raise InputError(f"{p} is a symlink to nothing (its target is missing, or it is a loop)")
        else:
            raise InputError(f"no such file or folder: {p}")
    unique: dict[Path, ImageFile] = {}
    seen_paths = set()
    for path, base in found:
        if _real(path) in seen_paths:
            continue
        seen_paths.add(_real(path))
        if base in unique:  # a.png and a.jpg, or the same name from two folders given as files
            ext = path.suffix.lstrip(".").lower() or "img"
            candidate, n = base.with_name(f"{base.name}_{ext}"), 2
            while candidate in unique:
                candidate, n = base.with_name(f"{base.name}_{ext}{n}"), n + 1
            base = candidate
        unique[base] = ImageFile(path, base)
    return list(unique.values())


def _real(path) -> Path:
    """The path with symlinks resolved as far as they go: a symlink loop is left as it is (Path.resolve raises),
    so it is reported like any other unreadable file."""
    return Path(os.path.realpath(path))


# ---- results ---------------------------------------------------------------------------------------------------
@dataclass
class Map:
    method: str
    target: int | None              # None for a class-agnostic method (the same map for every class)
    label: str | None
    score: float | None             # the target's softmax probability
    mask: np.ndarray                # (H, W) in [0, 1] at the model's input size
    files: dict = field(default_factory=dict)
    source: object | None = field(default=None, repr=False)  # the batch's explanation, until written
    index: int = 0                  # this image's row in it
    zero: str | None = None         # why the map is zero everywhere (no pictures are written then)

    @property
    def agnostic(self) -> bool:
        return self.target is None


@dataclass
class ImageReport:
    image: ImageFile
    error: str | None = None
    exception: Exception | None = field(default=None, repr=False)  # what error came from
    top: list = field(default_factory=list)       # [(class, label, probability)], best first
    maps: list[Map] = field(default_factory=list)
    json_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Runner:
    """One model opened for explaining files; `run` explains a list of ImageFile in batches and writes results."""

    def __init__(self, model, *, methods=("gradcam",), layers=None, target: str | Target = "top1", size=None,
                 mean=None, std=None, layout: str = "auto", bgr: bool = False, labels=None, device: str = "auto",
                 out: str | Path = "onnxcam-out", save_raw: bool = False, output: str | None = None,
                 max_pixels: int | None = image.MAX_PIXELS):
        start = time.perf_counter()
        unknown = [m for m in methods if m not in REGISTRY]
        if unknown or not methods:
            raise InputError(f"unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(REGISTRY)}")
        self.model_name = str(model)
        proto = load_model(model)
        self.pre = preprocess.resolve(proto, size=size, mean=mean, std=std, layout=layout, bgr=bgr)
        if self.pre.sources["size"] != "model":  # a size the model does not declare may be too small for it
            check_input_size(ModelGraph(proto, self.pre.input_shape(1)), self.pre)
        self.labels, self.labels_source = _labels(proto, labels)
        self.target = target if isinstance(target, Target) else parse_target(target, self.labels)
        self.explainer = Explainer(proto, layers=layers, device=device, input_shape=self.pre.input_shape(1),
                                   output=output)
        self.quantized = is_quantized(proto)
        self.methods = list(dict.fromkeys(methods))
        self.out = Path(out)
        self.save_raw = save_raw
        self.max_pixels = max_pixels
        # Layers chosen by name go into the file names: a run on other layers never replaces these files.
        self.tag = layer_tag(self.explainer.layers) if layers else ""
        self._classes_checked = False
        self._inputs: set[Path] = set()  # every input file of the run: outputs never replace one
        self._runs: dict = {}  # id(explainer) -> the batch's per-rank results (reset per batch)
        self.load_seconds = time.perf_counter() - start

    @property
    def layers(self) -> list[str]:
        return list(self.explainer.layers)

    @property
    def differentiated_as(self) -> str:
        """What the gradients are gradients of: said next to every explanation of a quantized model."""
        if not self.quantized:
            return "the model itself"
        return (f"int8 {self.quantized} model, differentiated as its dequantized float equivalent (straight-through "
                "rounding; zero gradient where a folded Relu/ReLU6 range saturates)")

    def label(self, c: int) -> str:
        return self.labels[c] if self.labels and 0 <= c < len(self.labels) else f"class {c}"

    def run(self, files: list[ImageFile], batch_size: int = 8, target: Target | None = None):
        """Yield one list of ImageReport per batch (images that cannot be read carry their error, and are skipped)."""
        self._inputs |= {_real(f.path) for f in files if f.rgb is None}
        for i in range(0, len(files), max(1, batch_size)):
            yield self.explain_batch(files[i:i + batch_size], target)

    def explain_batch(self, files: list[ImageFile], target: Target | None = None) -> list[ImageReport]:
        target = target or self.target
        self._inputs |= {_real(f.path) for f in files if f.rgb is None}
        reports = [ImageReport(f) for f in files]
        timings: dict[int, dict] = {}
        images: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # report index -> (image, model input)
        for i, f in enumerate(files):
            t = time.perf_counter()
            try:
                rgb = f.rgb if f.rgb is not None else image.read_image(f.path, self.max_pixels)
            except InputError as exc:
                _fail(reports[i], str(exc), exc)
                continue
            images[i] = rgb, image.to_input(rgb, self.pre)
            timings[i] = {"read_s": time.perf_counter() - t, "explain_s": {}}
        self._explain_images(reports, images, timings, target)
        for i, (rgb, _) in images.items():
            if reports[i].ok:
                self._write(reports[i], rgb, timings[i], target)
        return reports

    def _explain_images(self, reports: list[ImageReport], images: dict, timings: dict, target: Target) -> None:
        """Fill in the reports' maps and top classes from one run on the images (one per image after a
        NumericalError, to tell the images whose numbers are not finite from the others)."""
        if not images:
            return
        x = np.stack([xi for _, xi in images.values()])
        self._runs = {}  # one run per explainer for this batch, shared by the methods and the ranks
        probs, maps = None, {i: [] for i in images}
        try:
            for method in self.methods:
                t = time.perf_counter()
                for classes, e in self._explain(x, method, target):
                    probs = _softmax(e.logits) if probs is None else probs
                    for j, i in enumerate(images):
                        c = None if method in CLASS_AGNOSTIC else int(classes[j])
                        maps[i].append(Map(method, c, None if c is None else self.label(c),
                                           None if c is None else float(probs[j, c]), e.maps[j], source=e, index=j))
                    if method in CLASS_AGNOSTIC:  # every rank gives the same map: keep one
                        break
                for i in images:
                    timings[i]["explain_s"][method] = (time.perf_counter() - t) / len(images)
        except NumericalError as exc:
            if len(images) > 1:
                for i, item in images.items():
                    self._explain_images(reports, {i: item}, timings, target)
                return
            (i,) = images
            _fail(reports[i], f"image {reports[i].image.path}: {exc}", exc)
            return
        for j, i in enumerate(images):
            bad = next((m for m in maps[i] if not np.isfinite(m.mask).all()), None)
            if bad is not None:  # the run's numbers were finite, the map's arithmetic was not
                _fail(reports[i], f"image {reports[i].image.path}: the {bad.method} map holds NaN or Inf")
                continue
            for m in maps[i]:
                m.zero = _zero_reason(m) if not m.mask.any() else None
            reports[i].maps = maps[i]
            order = np.argsort(-probs[j])[:TOP_K]
            reports[i].top = [(int(c), self.label(int(c)), float(probs[j, c])) for c in order]

    def _explain(self, x: np.ndarray, method: str, target: Target):
        """Yield (classes (N,), Explanation) for each class rank (top-k) or each given class.

        All ranks (or given classes) come from one run with S targets per sample: one forward and S backward
        passes through the part after the layer, not S inferences. Methods on the same layers share that run;
        those that need runs of their own (REGISTRY's shared_run False: Score-CAM's masked forwards, FullGrad's
        bias gradients, ...) are called once per rank with that rank's classes."""
        obj = method_object(self.explainer, method, channels_last=self.pre.layout == "nhwc")
        if not REGISTRY[canonical(method)].shared_run:
            yield from self._explain_own(x, method, target, obj)
            return
        ex = obj.explainer
        key = id(ex)
        if key not in self._runs:
            if target.kind == "top":
                r = ex.run(x, top_k=min(target.k, self._classes(ex, x)))
            else:
                r = ex.run(x, np.tile(np.asarray(target.classes, np.int64), (len(x), 1)))
            self._check_classes(r.logits)
            self._runs[key] = [r.rank(k) for k in range(r.targets.shape[1])] if r.targets.ndim == 2 else [r]
        for r in self._runs[key]:
            maps = obj.maps_for(x, r)
            yield r.targets, Explanation(maps, dict(obj.raw), r.logits, r.targets, list(obj.target_layers), method, r)

    def _explain_own(self, x: np.ndarray, method: str, target: Target, obj):
        """As _explain for a method that makes its own runs: its class is called per rank with the classes."""
        if target.kind == "top":
            logits = self._plain_logits(x)
            order = np.argsort(-logits, axis=1, kind="stable")[:, :min(target.k, logits.shape[1])]
            ranks = [order[:, k] for k in range(order.shape[1])]
        else:
            ranks = [np.full(len(x), c, np.int64) for c in target.classes]
        for classes in ranks:
            maps = _as_masks(obj(x, _own_targets(method, obj, x, classes)))
            e = explanation(obj, maps, method)
            self._check_classes(e.logits)
            yield classes, e

    def _plain_logits(self, x: np.ndarray) -> np.ndarray:
        """The scores of x (one run of the shared explainer with no target), to rank the classes."""
        key = ("logits", id(self.explainer))
        if key not in self._runs:
            self._classes(self.explainer, x)
            self._runs[key] = np.asarray(self.explainer.run(x).logits).reshape(len(x), -1)
        return self._runs[key]

    @staticmethod
    def _classes(ex: Explainer, x: np.ndarray) -> int:
        shape = tuple(ex.score_shape(x.shape))
        if len(shape) != 2 or not isinstance(shape[1], int):
            raise _not_a_classifier(shape)
        return shape[1]

    def _check_classes(self, logits: np.ndarray) -> None:
        if self._classes_checked:
            return
        if logits.ndim != 2:
            raise _not_a_classifier(logits.shape)
        k = logits.shape[1]
        if self.labels is not None and len(self.labels) != k:
            raise InputError(f"{len(self.labels)} class names ({self.labels_source}) for a model with {k} classes")
        self._classes_checked = True

    def _write(self, rep: ImageReport, rgb: np.ndarray, timings: dict, target: Target) -> None:
        t = time.perf_counter()
        h, w = rgb.shape[:2]
        base = self.out / rep.image.base
        if self.tag:
            base = base.with_name(f"{base.name}.{self.tag}")
        inputs = self._inputs
        rep.json_path = base.with_name(f"{base.name}.json")
        _refuse_inputs([rep.json_path], inputs)
        entries = []
        for m in rep.maps:
            stem = f"{base.name}.{m.method}" + ("" if m.agnostic else f".{m.target}")
            files = {}
            if m.zero is None:  # a zero map would be a uniform picture that looks like an answer: none is written
                files = {"overlay": base.with_name(f"{stem}.overlay.png"),
                         "heatmap": base.with_name(f"{stem}.heatmap.png")}
            if self.save_raw:
                files["raw"] = base.with_name(f"{stem}.npz")
            _refuse_inputs(files.values(), inputs)
            if m.zero is None:
                atomic_write(files["overlay"], image.encode_png(image.overlay(rgb, m.mask)))
                atomic_write(files["heatmap"], image.encode_png(image.heatmap(m.mask, (w, h))))
            if self.save_raw:
                write_npz(files["raw"], **_raw_arrays(m))
            m.files, m.source = files, None  # the batch's activations are no longer needed
            entries.append({"method": m.method, "class": m.target, "label": m.label,
                            "score": None if m.score is None else round(m.score, 6),
                            "class_agnostic": m.agnostic, "zero_map": m.zero, "layers": self.layers,
                            **{k: v.name for k, v in files.items()}})
        timings["write_s"] = time.perf_counter() - t
        record = {
            "image": str(rep.image.path), "width": w, "height": h,
            "model": self.model_name, "model_hash": self.explainer.digest,
            "top": [{"class": c, "label": lab, "score": round(p, 6)} for c, lab, p in rep.top],
            "target": str(target), "layers": self.layers, "explanations": entries,
            "preprocess": self.pre.describe(), "labels": self.labels_source,
            "quantized": self.quantized, "differentiated_as": self.differentiated_as,
            "timings": _rounded(timings), "onnxcam": __version__,
        }
        write_json(rep.json_path, record)


def layer_tag(layers: list[str]) -> str:
    """The layers as a file-name part: tensor names with characters other than letters, digits, '_', '.', '-'
    replaced, plus a short hash of the real names when anything was replaced or cut (so two layers never share a
    tag). '/_conv_head/Conv_output_0' -> 'conv_head_Conv_output_0-<6 hex>'."""
    text = "+".join(layers)
    tag = re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("._")[:60]
    if tag != text:
        tag = f"{tag}-{hashlib.sha1(text.encode()).hexdigest()[:6]}".lstrip("-")
    return tag


def _fail(rep: ImageReport, message: str, exc: Exception | None = None) -> None:
    rep.error, rep.exception, rep.maps, rep.top = message, exc, [], []


def _zero_reason(m: Map) -> str:
    """Why a map is zero everywhere, per layer: a zero gradient (a zero-weight head, a saturated unit), zero
    activations, or a raw map that is nowhere positive (CAM keeps the positive part) or uniform."""
    e, j = m.source, m.index
    result = getattr(e, "result", None)
    reasons = []
    for layer in e.layers:
        grads = getattr(result, "gradients", {}).get(layer)
        acts = getattr(result, "activations", {}).get(layer)
        raw = (getattr(e, "raw", None) or {}).get(layer)
        if grads is not None and not m.agnostic and not np.asarray(grads)[j].any():
            reasons.append(f"the target's gradient at {layer} is zero")
        elif acts is not None and not np.asarray(acts)[j].any():
            reasons.append(f"the activations at {layer} are zero")
        elif raw is not None and np.asarray(raw)[j].max() <= 0:
            reasons.append(f"the {m.method} map at {layer} is nowhere positive (the map keeps only positive "
                           "values)")
        else:
            reasons.append(f"the {m.method} map at {layer} is uniform")
    return "; ".join(reasons)


def _own_targets(method: str, obj, x: np.ndarray, classes: np.ndarray) -> list:
    """The targets of a method called on its own: the classes, or for Finer-CAM its comparison target with each
    class as the main one."""
    if canonical(method) != "finercam":
        return [int(c) for c in classes]
    from .cam.cams import finer_targets

    logits = obj.base_cam.score_outputs(x).reshape(len(x), -1)
    return [finer_targets(logits[j:j + 1], target_idx=int(c))[0] for j, c in enumerate(classes)]


def _as_masks(maps: np.ndarray) -> np.ndarray:
    """(N, H, W) maps in [0, 1]: the guided methods' (N, H, W, C) input-space maps become the largest magnitude
    over channels, scaled per image to [0, 1] (an all-zero map stays zero)."""
    maps = np.asarray(maps, np.float32)
    if maps.ndim == 3:
        return maps
    mag = np.abs(maps).max(axis=-1)
    top = mag.reshape(len(mag), -1).max(axis=1)[:, None, None]
    return np.divide(mag, top, out=np.zeros_like(mag), where=top > 0)


def _not_a_classifier(shape: tuple) -> InputError:
    return InputError(f"the explained score has shape {shape}; onnxcam explain needs a classifier's (N, classes) "
                      "scores")


def _raw_arrays(m: Map) -> dict[str, np.ndarray]:
    """The map at input size, and per layer n: lowres_n (the method's raw map), activations_n, gradients_n."""
    e, j = m.source, m.index
    arrays = {"map": m.mask.astype(np.float32), "logits": e.logits[j],
              "target": np.int64(-1 if m.agnostic else m.target),
              "layers": np.array(e.layers)}
    raw = getattr(e, "raw", None) or {}
    result = getattr(e, "result", None)
    for n, layer in enumerate(e.layers):
        for key, source in (("lowres", raw), ("activations", getattr(result, "activations", {})),
                            ("gradients", getattr(result, "gradients", {}))):
            if layer in source:
                arrays[f"{key}_{n}"] = np.asarray(source[layer])[j]
    return arrays


def _rounded(d):
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    return round(d, 4) if isinstance(d, float) else d


def _labels(proto, labels_file) -> tuple[list[str] | None, str]:
    """Class names: a file (or "imagenet" for the bundled ImageNet list), else the model's metadata, else none."""
    if labels_file == "imagenet":
        return preprocess.imagenet_labels(), "imagenet (bundled)"
    if labels_file is not None:
        return preprocess.read_labels(labels_file), f"file {labels_file}"
    found = preprocess.labels_from_metadata(proto)
    if found is not None:
        return found, f"metadata {preprocess.LABELS_KEY}"
    return None, "none"


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.reshape(len(logits), -1).astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _refuse_inputs(paths, inputs: set) -> None:
    for p in paths:
        if _real(p) in inputs:
            raise InputError(f"refusing to write over the input file {p}: choose another --out folder")
