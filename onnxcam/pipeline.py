"""Explaining image files: find them, preprocess, run the CAM methods, write pictures and one JSON per image.

The command line (cli.py) is a thin shell around `Runner`; this module neither prints nor exits.
Files written per image (base = the image's name without its extension, kept unique in its output folder;
with layers chosen by name, base is followed by .<layer tag> (layer_tag), so runs on other layers never replace
these files; class-agnostic methods (EigenCAM, KPCA-CAM) have no .<class>: their map is written once):

    <base>.<method>.<class>.overlay.png   the heatmap blended on the image, at the image's original resolution
    <base>.<method>.<class>.heatmap.png   with heatmap: the heatmap alone, same resolution
    <base>.<method>.<class>.npz           with save_raw: maps, activations, gradients, logits
    <base>.json                           predictions, targets, layers, model hash, preprocessing, timings

A map that is zero everywhere (e.g. the target's gradient at the layer is zero) gets no pictures: its JSON entry
says why in "zero_map". The JSON is written last, so its presence means the image's pictures are complete; it is
strict JSON (an image whose logits, activations or gradients are not finite fails instead). With resume, an image
whose JSON already records the same model hash, methods, layers, target, preprocessing and pictures is skipped.

`Runner.run` overlaps three stages joined by bounded queues (one batch each), so a folder is explained at about
the speed of classifying it and memory does not grow with the number of images:

    loader thread   resume check, decoding and preprocessing (a few threads: OpenCV releases the GIL)
    model thread    the onnxruntime run and the maps at the model's input size
    writer thread   pictures at each image's resolution, PNG encoding, the JSON (a few threads)

Results come back in input order, one list per batch. `Runner.write_report` is the one place results become files:
a subclass overrides it to keep results in memory or write them elsewhere.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from . import __version__, image, preprocess, runtime
from .cam.api import CLASS_AGNOSTIC, REGISTRY, Explanation, canonical, explanation, method_object
from .errors import InputError, NumericalError
from .explainer import Explainer
from .files import atomic_write, write_json, write_npz
from .graph.load import LoadedModel
from .graph.model import ModelGraph
from .modelinfo import check_input_size

log = logging.getLogger(__name__)
TOP_K = 5
# zlib levels of the pictures (the pixels are the same at any level). A heatmap is smooth: level 1 with zlib's
# default strategy is both faster and smaller than OpenCV's default (run-length). An overlay holds the photo's
# detail: every level that compresses costs more CPU time than the model spends on the image.
HEATMAP_PNG_LEVEL = 1
OVERLAY_PNG_LEVEL = None
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
    skipped: bool = False                         # resume: already explained alike, nothing done now

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Batch:
    """Images on their way through the stages: decoded images and inputs by report index, then maps, then files."""

    reports: list[ImageReport]
    target: Target
    images: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (image, model input)
    timings: dict[int, dict] = field(default_factory=dict)


class _Failed:
    """An exception raised in a stage, passed down the queues so that the caller's thread raises it."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()  # no more batches
# Batches decoded and not yet written: one being written, one at the model (the next one's halves queued behind
# its own as soon as it is read), one being read. The queues between
# the stages could hold two more, but each batch holds its full-size images: peak RSS would grow with the photos'
# size for no speed (each stage still finds its next batch ready). Two would stop the reading of the next batch
# while one is written (tests/test_fleet_local.py checks that it is not).
_BATCHES_ALIVE = 3
_M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
_SKIPPED_PER_BATCH = 1000


class Runner:
    """One model opened for explaining files; `run` explains a list of ImageFile in batches and writes results.

    resume: skip images whose JSON already records this model (hash), methods, layers, target and preprocessing.
    caption: label each overlay picture with its class, score, method and layer (a band of text above it).
    heatmap: also write the heatmap alone (a second PNG per map; off by default: the overlay is the picture people
    look at, the .npz of save_raw holds the map's values, and the second PNG costs as much as a tenth of the run).
    workers: threads for decoding and for writing pictures [default: up to 4, at most the CPU count].
    model_workers: each batch runs through the model as this many parts at once, in threads (see `model_workers()`;
    sessions made after `share_cores(model_workers)` run on a share of the cores each)."""

    def __init__(self, model, *, methods=("gradcam",), layers=None, target: str | Target = "top1", size=None,
                 mean=None, std=None, layout: str = "auto", bgr: bool = False, labels=None, device: str = "auto",
                 out: str | Path = "onnxcam-out", save_raw: bool = False, output: str | None = None,
                 max_pixels: int | None = image.MAX_PIXELS, resume: bool = False, caption: bool = False,
                 workers: int | None = None, model_workers: int = 1, heatmap: bool = False):
        start = time.perf_counter()
        unknown = [m for m in methods if m not in REGISTRY]
        if unknown or not methods:
            raise InputError(f"unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(REGISTRY)}")
        self.model_name = str(model)
        loaded = LoadedModel.of(model)  # read once: the Explainer below keeps it, and drops the weights after its build
        proto = loaded.skeleton
        self.pre = preprocess.resolve(proto, size=size, mean=mean, std=std, layout=layout, bgr=bgr)
        if self.pre.sources["size"] != "model":  # a size the model does not declare may be too small for it
            check_input_size(ModelGraph(proto, self.pre.input_shape(1), loaded.weights), self.pre)
        self.labels, self.labels_source = _labels(proto, labels)
        self.target = target if isinstance(target, Target) else parse_target(target, self.labels)
        self.explainer = Explainer(loaded, layers=layers, device=device, input_shape=self.pre.input_shape(1),
                                   output=output)
        self.quantized = self.explainer.quantized
        self.methods = list(dict.fromkeys(methods))
        self.out = Path(out)
        self.save_raw = save_raw
        self.max_pixels = max_pixels
        self.resume = resume
        self.caption = caption
        self.heatmap = heatmap
        self.workers = max(1, workers or min(4, os.cpu_count() or 1))
        # Layers chosen by name go into the file names: a run on other layers never replaces these files.
        self.tag = layer_tag(self.explainer.layers) if layers else ""
        self.model_workers = max(1, model_workers)
        self._classes_checked = False
        self._inputs: set[Path] = set()  # every input file of the run: outputs never replace one
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

    def run(self, files: list[ImageFile], batch_size: int = 8, target: Target | None = None
            ) -> Iterator[list[ImageReport]]:
        """Yield one list of ImageReport per batch, in input order (images that cannot be read carry their error,
        and are skipped; with resume, images explained alike before come back with `skipped` set).

        Decoding, the model and writing overlap in threads joined by queues of one batch each: at most a few
        batches are in memory, however many files there are. An exception in any stage (e.g. an output that
        would replace an input) stops the others and is raised here; closing the generator early stops them too.
        """
        target = target or self.target
        self._inputs |= {_real(f.path) for f in files if f.rgb is None}
        stop = threading.Event()
        loaded, running, explained, written = (queue.Queue(maxsize=1) for _ in range(4))
        alive = threading.BoundedSemaphore(_BATCHES_ALIVE)  # taken by the loader per batch, given back once written
        with ThreadPoolExecutor(self.workers, thread_name_prefix="onnxcam-io") as pool, \
                ThreadPoolExecutor(self.model_workers, thread_name_prefix="onnxcam-model") as model:
            batches = self._batches(files, max(1, batch_size), target, pool, stop, alive)
            stages = [_start("load", batches, None, loaded, stop),
                      _start("model", _drain(loaded, stop), partial(self._start_explaining, pool=model), running,
                             stop),
                      _start("model-done", _drain(running, stop), self._explained, explained, stop),
                      _start("write", _drain(explained, stop), partial(self._write_batch, pool=pool, alive=alive),
                             written, stop)]
            try:
                for item in _drain(written, stop):
                    if isinstance(item, _Failed):
                        raise item.exc
                    yield item.reports
            finally:
                stop.set()  # the stages end at their next queue operation; a run or a file in progress completes
                for t in stages:
                    t.join()

    def explain_batch(self, files: list[ImageFile], target: Target | None = None) -> list[ImageReport]:
        """Explain and write one batch in the caller's thread (no resume check); return its reports."""
        target = target or self.target
        self._inputs |= {_real(f.path) for f in files if f.rgb is None}
        batch = self._load(files, target)
        self._explain_loaded(batch)
        return self._write_batch(batch).reports

    def caption_lines(self, m: Map) -> list[str]:
        """The caption of an overlay: the class and its score, then the method and layers."""
        what = "any class" if m.agnostic else f"{m.label} {m.score:.2f}"
        return [what, f"{m.method} @ {', '.join(self.layers)}"]

    def sheet_entries(self, rep: ImageReport) -> list[dict]:
        """One image's entries for onnxcam.audit.sheet.write_contact_sheet: one per overlay picture (read back
        from the JSON for an image skipped by resume), or the error of an image that failed."""
        if not rep.ok:
            return [{"image": str(rep.image.path), "error": rep.error}]
        if rep.skipped:
            try:
                record = json.loads(rep.json_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                return [{"image": str(rep.image.path), "error": f"cannot read {rep.json_path}: {exc}"}]
            found = [(e["method"], e["class"], e["label"], e["score"], rep.json_path.with_name(e["overlay"]))
                     for e in record["explanations"] if e.get("overlay")]
        else:
            found = [(m.method, m.target, m.label, m.score, m.files["overlay"]) for m in rep.maps
                     if "overlay" in m.files]
        return [{"image": str(rep.image.path), "picture": Path(picture).relative_to(self.out).as_posix(),
                 "method": method, "layer": ", ".join(self.layers), "class_name": label, "class_index": c,
                 "score": score} for method, c, label, score, picture in found]

    # ---- the stages ------------------------------------------------------------------------------------------
    def _batches(self, files: list[ImageFile], size: int, target: Target, pool, stop, alive=None
                 ) -> Iterator[_Batch]:
        """Batches of `size` images to explain, decoded and preprocessed in the pool; images found done (resume)
        ride along in the batch of the images after them, so that results stay in input order (a batch holds at
        most _SKIPPED_PER_BATCH of them: a resumed run of many images done reports them as it goes)."""
        chunk: list[ImageFile] = []
        done: set[int] = set()
        for f in files:
            if stop.is_set():
                return
            if self.resume and self._done_before(f, target):
                done.add(len(chunk))
            chunk.append(f)
            if len(chunk) - len(done) == size or len(done) == _SKIPPED_PER_BATCH:
                if not _acquire(alive, stop):
                    return
                yield self._load(chunk, target, pool, done)
                chunk, done = [], set()
        if chunk and _acquire(alive, stop):
            yield self._load(chunk, target, pool, done)

    def _load(self, files: list[ImageFile], target: Target, pool=None, done=frozenset()) -> _Batch:
        """Read and preprocess the files (in the pool's threads when given), but those at the indices `done`."""
        batch = _Batch([ImageReport(f, skipped=i in done, json_path=self._json_path(f) if i in done else None)
                        for i, f in enumerate(files)], target)
        todo = [i for i in range(len(files)) if i not in done]
        for i, loaded in zip(todo, (pool.map if pool else map)(self._load_one, [files[i] for i in todo])):
            if isinstance(loaded, InputError):
                _fail(batch.reports[i], str(loaded), loaded)
            else:
                rgb, x, took = loaded
                batch.images[i] = rgb, x
                batch.timings[i] = {"read_s": took, "explain_s": {}}
        return batch

    def _load_one(self, f: ImageFile) -> tuple[np.ndarray, np.ndarray, float] | InputError:
        t = time.perf_counter()
        try:
            rgb = f.rgb if f.rgb is not None else image.read_image(f.path, self.max_pixels)
        except InputError as exc:
            return exc
        return rgb, image.to_input(rgb, self.pre), time.perf_counter() - t

    def _explain_loaded(self, batch: _Batch) -> _Batch:
        """The batch's maps, in the caller's thread."""
        self._explain_images(batch.reports, batch.images, batch.timings, batch.target)
        return self._explained((batch, []))

    def _start_explaining(self, batch: _Batch, pool) -> tuple[_Batch, list]:
        """(batch, futures): the batch's maps being made in model_workers parts in the pool's threads. onnxruntime
        releases the GIL: two runs of half a batch, on one core each, do more work per second than one run of the
        batch whose threads wait for each other at every node (tools/bench_folder.py). The next batch's parts are
        queued behind these at once (the model stage does not wait for them): a part slowed by the writers sharing
        its core does not leave the other core idle until it ends."""
        explain = partial(self._explain_images, batch.reports, timings=batch.timings, target=batch.target)
        return batch, [pool.submit(explain, part) for part in _split(batch.images, self.model_workers)]

    @staticmethod
    def _explained(running: tuple[_Batch, list]) -> _Batch:
        """The batch once its parts are made (an exception in one is raised here), without its model inputs."""
        batch, futures = running
        for f in futures:
            f.result()
        for i, (rgb, _) in batch.images.items():  # the model inputs are done with: only the pictures need the image
            batch.images[i] = rgb, None
        return batch

    def _write_batch(self, batch: _Batch, pool=None, alive=None) -> _Batch:
        """Write the batch's explained images (in the pool's threads when given); then drop its images (and give
        its place back to the loader: `alive`)."""
        ok = [i for i in batch.images if batch.reports[i].ok]

        def write(i: int) -> None:
            rgb = batch.images[i][0]
            batch.images[i] = None, None  # the image's only reference is rgb: freed as soon as its pictures are
            self.write_report(batch.reports[i], rgb, batch.timings[i], batch.target)

        for _ in (pool.map if pool else map)(write, ok):  # consumed: an exception in a write is raised here
            pass
        batch.images.clear()
        if alive is not None:
            alive.release()
        return batch

    # ---- resume ----------------------------------------------------------------------------------------------
    def _done_before(self, f: ImageFile, target: Target) -> bool:
        """Whether f's JSON records an explanation like this run's, with every file it names present. Anything
        unreadable or different (another model, method, layer, target, preprocessing, caption) means no."""
        if f.rgb is not None:
            return False
        path = self._json_path(f)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            entries = record["explanations"]
            same = (record["model_hash"] == self.explainer.digest and record["layers"] == self.layers
                    and record["target"] == str(target) and record["preprocess"] == _as_json(self.pre.describe())
                    and record.get("captioned", False) == self.caption
                    and all(bool(e.get("heatmap")) == self.heatmap for e in entries if e.get("overlay"))
                    and sorted({e["method"] for e in entries}) == sorted(self.methods))
            files = [e[k] for e in entries for k in ("overlay", "heatmap", "raw") if e.get(k)]
            raw = all("raw" in e for e in entries) or not self.save_raw
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return same and raw and all((path.parent / name).is_file() for name in files)

    def _json_path(self, f: ImageFile) -> Path:
        base = self._base(f)
        return base.with_name(f"{base.name}.json")

    def _base(self, f: ImageFile) -> Path:
        """The output path of f without suffix: in the output folder, with the layer tag when layers were named."""
        base = self.out / f.base
        return base.with_name(f"{base.name}.{self.tag}") if self.tag else base

    def _explain_images(self, reports: list[ImageReport], images: dict, timings: dict, target: Target) -> None:
        """Fill in the reports' maps and top classes from one run on the images (one per image after a
        NumericalError, to tell the images whose numbers are not finite from the others)."""
        if not images:
            return
        x = np.stack([xi for _, xi in images.values()])
        runs: dict = {}  # one run per explainer for this batch, shared by the methods and the ranks
        probs, maps = None, {i: [] for i in images}
        try:
            for method in self.methods:
                t = time.perf_counter()
                for classes, e in self._explain(x, method, target, runs):
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

    def _explain(self, x: np.ndarray, method: str, target: Target, runs: dict):
        """Yield (classes (N,), Explanation) for each class rank (top-k) or each given class.

        All ranks (or given classes) come from one run with S targets per sample: one forward and S backward
        passes through the part after the layer, not S inferences. Methods on the same layers share that run;
        those that need runs of their own (REGISTRY's shared_run False: Score-CAM's masked forwards, FullGrad's
        bias gradients, ...) are called once per rank with that rank's classes. runs: the batch's runs so far, by
        explainer (the parts of a batch run in several threads at once: no run state on self)."""
        obj = method_object(self.explainer, method, channels_last=self.pre.layout == "nhwc")
        if not REGISTRY[canonical(method)].shared_run:
            yield from self._explain_own(x, method, target, obj, runs)
            return
        ex = obj.explainer
        key = id(ex)
        if key not in runs:
            if target.kind == "top":
                r = ex.run(x, top_k=min(target.k, self._classes(ex, x)))
            else:
                r = ex.run(x, np.tile(np.asarray(target.classes, np.int64), (len(x), 1)))
            self._check_classes(r.logits)
            runs[key] = [r.rank(k) for k in range(r.targets.shape[1])] if r.targets.ndim == 2 else [r]
        for r in runs[key]:
            maps = obj.maps_for(x, r)
            yield r.targets, Explanation(maps, dict(obj.raw), r.logits, r.targets, list(obj.target_layers), method, r)

    def _explain_own(self, x: np.ndarray, method: str, target: Target, obj, runs: dict):
        """As _explain for a method that makes its own runs: its class is called per rank with the classes."""
        if target.kind == "top":
            logits = self._plain_logits(x, runs)
            order = np.argsort(-logits, axis=1, kind="stable")[:, :min(target.k, logits.shape[1])]
            ranks = [order[:, k] for k in range(order.shape[1])]
        else:
            ranks = [np.full(len(x), c, np.int64) for c in target.classes]
        for classes in ranks:
            maps = _as_masks(obj(x, _own_targets(method, obj, x, classes)))
            e = explanation(obj, maps, method)
            self._check_classes(e.logits)
            yield classes, e

    def _plain_logits(self, x: np.ndarray, runs: dict) -> np.ndarray:
        """The scores of x (one run of the shared explainer with no target), to rank the classes."""
        key = ("logits", id(self.explainer))
        if key not in runs:
            self._classes(self.explainer, x)
            runs[key] = np.asarray(self.explainer.run(x).logits).reshape(len(x), -1)
        return runs[key]

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

    def write_report(self, rep: ImageReport, rgb: np.ndarray, timings: dict, target: Target) -> None:
        """Turn one explained image into files: the pictures, the .npz with save_raw, then the JSON (last: its
        presence means the image is complete). The seam for subclasses (audit/compare.py keeps results in memory
        instead). Called from the writer's threads, several images at once: an override must be thread-safe.
        rep.maps hold the masks; each map's `source` (the batch's activations and gradients) should be set to
        None once no longer needed."""
        t = time.perf_counter()
        h, w = rgb.shape[:2]
        base = self._base(rep.image)
        inputs = self._inputs
        rep.json_path = self._json_path(rep.image)
        _refuse_inputs([rep.json_path], inputs)
        entries = []
        for m in rep.maps:
            stem = f"{base.name}.{m.method}" + ("" if m.agnostic else f".{m.target}")
            files = {}
            if m.zero is None:  # a zero map would be a uniform picture that looks like an answer: none is written
                files = {"overlay": base.with_name(f"{stem}.overlay.png")}
                if self.heatmap:
                    files["heatmap"] = base.with_name(f"{stem}.heatmap.png")
            if self.save_raw:
                files["raw"] = base.with_name(f"{stem}.npz")
            _refuse_inputs(files.values(), inputs)
            if m.zero is None:
                picture, heat = image.pictures(rgb, m.mask)
                if self.heatmap:
                    atomic_write(files["heatmap"], image.encode_png(heat, HEATMAP_PNG_LEVEL))
                del heat
                if self.caption:
                    picture = image.caption(picture, self.caption_lines(m))
                atomic_write(files["overlay"], image.encode_png(picture, OVERLAY_PNG_LEVEL))
                del picture
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
            "quantized": self.quantized, "differentiated_as": self.differentiated_as, "captioned": self.caption,
            "timings": _rounded(timings), "onnxcam": __version__,
        }
        write_json(rep.json_path, record)


class Progress:
    """Where a run stands, as text for the command line (this module prints nothing): counts, rate and ETA.

    The rate counts only images worked on (explained or failed), from the start of the run; images skipped by
    resume come back at once and would make it a lie."""

    def __init__(self, total: int, clock=time.monotonic):
        self.total, self.clock, self.start = total, clock, clock()
        self.explained = self.failed = self.skipped = 0

    def add(self, reports: list[ImageReport]) -> None:
        for rep in reports:
            if rep.skipped:
                self.skipped += 1
            elif rep.ok:
                self.explained += 1
            else:
                self.failed += 1

    @property
    def done(self) -> int:
        return self.explained + self.failed + self.skipped

    @property
    def rate(self) -> float | None:
        """Images worked on per second, None before the first."""
        worked, took = self.explained + self.failed, self.clock() - self.start
        return worked / took if worked and took > 0 else None

    def eta(self) -> str:
        rate = self.rate
        if self.done >= self.total:
            return "0:00"
        if rate is None:
            return "-:--"
        s = round((self.total - self.done) / rate)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

    def line(self) -> str:
        """One line for a log: 'Progress: 16/64 images (15 explained, 1 failed, 0 skipped), 3.2 images/s, ETA 0:15'."""
        rate = self.rate
        return (f"Progress: {self.done}/{self.total} images ({self.explained} explained, {self.failed} failed, "
                f"{self.skipped} skipped), {'-' if rate is None else f'{rate:.1f}'} images/s, ETA {self.eta()}")

    def bar(self, width: int = 30) -> str:
        """A bar for a terminal, redrawn in place: 'Explaining [#######-------]  16/64  3.2 images/s  ETA 0:15'."""
        filled = width * self.done // max(self.total, 1)
        rate = self.rate
        return (f"Explaining [{'#' * filled}{'-' * (width - filled)}] {self.done:>{len(str(self.total))}}/{self.total}"
                f"  {'-' if rate is None else f'{rate:.1f}'} images/s  ETA {self.eta()}")


def model_workers(images: int, batch_size: int, cpus: int | None = None) -> int:
    """In how many parts at once the command line runs each batch through the model: two when there are two batches
    or more and two cores or more (each part's run then gets half the cores: share_cores), else one (a single
    batch keeps every core on one run: its latency, not the throughput, is what counts there)."""
    cpus = cpus or os.cpu_count() or 1
    return 2 if cpus >= 2 and images > batch_size else 1


def share_cores(workers: int) -> None:
    """Sessions made from now on run on cpus // workers intra-op threads each, for a Runner running each batch in
    `workers` parts at once (process-wide, like configure_process, whose returned function undoes this too)."""
    if workers > 1:
        runtime.SESSION_CONFIG[runtime.INTRA_OP_THREADS] = str(max(1, (os.cpu_count() or 1) // workers))
    else:
        runtime.SESSION_CONFIG.pop(runtime.INTRA_OP_THREADS, None)


def configure_process() -> Callable[[], None]:
    """Settings for a process that runs the pipeline and little else (the command line calls this before it opens
    the model); process-wide, so the library never calls it. Returns what undoes the session settings (the command
    line calls it when the command ends: a host process, or tests calling it repeatedly, keep their sessions).

    - runtime.PIPELINE_SESSION_CONFIG for the sessions made from now on (no spinning onnxruntime threads, no memory
      pattern: see there); share_cores then divides the cores between the parts of a batch run at once;
    - glibc's malloc limited to one arena. Each thread that allocates (decoding, the model, the writers, the I/O
      pool) otherwise gets an arena of its own, and the freed full-size images and PNG buffers stay mapped in each:
      peak RSS on 64 photos with resnet50 went from 444 to 386 MB, for no measured CPU time (the threads spend it in
      OpenCV, onnxruntime and zlib, not in malloc). Nothing happens where the C library is not glibc."""
    before = dict(runtime.SESSION_CONFIG)
    runtime.SESSION_CONFIG.update(runtime.PIPELINE_SESSION_CONFIG)

    def restore() -> None:
        runtime.SESSION_CONFIG.clear()
        runtime.SESSION_CONFIG.update(before)

    try:
        libc = ctypes.CDLL(None)
        if hasattr(libc, "gnu_get_libc_version"):
            libc.mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc: nothing to limit
        log.debug("malloc arenas not limited: not glibc")
    return restore


def layer_tag(layers: list[str]) -> str:
    """The layers as a file-name part: tensor names with characters other than letters, digits, '_', '.', '-'
    replaced, plus a short hash of the real names when anything was replaced or cut (so two layers never share a
    tag). '/_conv_head/Conv_output_0' -> 'conv_head_Conv_output_0-<6 hex>'."""
    text = "+".join(layers)
    tag = re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("._")[:60]
    if tag != text:
        tag = f"{tag}-{hashlib.sha1(text.encode()).hexdigest()[:6]}".lstrip("-")
    return tag


def _start(name: str, items, work, sink: queue.Queue, stop: threading.Event) -> threading.Thread:
    """A started thread running _stage (a daemon: a stage stuck in a long run never holds up the exit)."""
    t = threading.Thread(target=_stage, name=f"onnxcam-{name}", args=(items, work, sink, stop), daemon=True)
    t.start()
    return t


def _stage(items, work, sink: queue.Queue, stop: threading.Event) -> None:
    """One stage's thread: put work(item) (the item itself when work is None) into sink for each item, then _END.
    An exception, raised here or coming down as _Failed, is passed on and ends the stage."""
    try:
        for item in items:
            if isinstance(item, _Failed):
                _put(sink, item, stop)
                return
            if not _put(sink, item if work is None else work(item), stop):
                return
        _put(sink, _END, stop)
    except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
        _put(sink, _Failed(exc), stop)


def _drain(q: queue.Queue, stop: threading.Event) -> Iterator:
    """The items of q until _END (or until stop is set)."""
    while (item := _get(q, stop)) is not _END:
        yield item


def _acquire(sem: threading.Semaphore | None, stop: threading.Event) -> bool:
    """Take a place of sem (None: no limit), waiting while there is none; False once stop is set."""
    while sem is not None and not stop.is_set():
        if sem.acquire(timeout=0.1):
            return True
    return sem is None


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put item into q, waiting while it is full; False (not put) once stop is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    """The next item of q, waiting while it is empty; _END once stop is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return _END


def _split(items: dict, parts: int) -> list[dict]:
    """items in up to `parts` dicts of consecutive entries, sizes differing by one at most (no empty part)."""
    keys = list(items)
    bounds = np.linspace(0, len(keys), min(parts, len(keys)) + 1).round().astype(int)
    return [{k: items[k] for k in keys[a:b]} for a, b in itertools.pairwise(bounds)] or [items]


def _as_json(value):
    """value as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


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
    dims = ", ".join(str(d) for d in shape)  # symbolic dims as their names: (16, N, 6), not (16, 'N', 6)
    return InputError(f"the explained score has shape ({dims}{',' if len(shape) == 1 else ''}); onnxcam explain "
                      "needs a classifier's (N, classes) scores")


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
            raise InputError(f"refusing to write over the input file {p}: choose another output folder", option="out")
