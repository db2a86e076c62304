"""Comparing models' explanations of the same images: pairing, shared targets and agreement figures.

Every model keeps its own preprocessing, layer and labels (one `pipeline.Runner` each); every model explains the
same class: the first model's top-1 class (so a prediction flip is explained, not hidden) or the given classes,
mapped through the class names when the models order their classes differently. Each model is compared with the
first, per image, method and class, with the maps resized to the image's own resolution (layers of different
spatial sizes compare).

Agreement figures (1 = the same, all in [0, 1]; what `below` checks): top1 (the two top-1 classes are the same
class), top5 (the share of the first model's 5 best classes among the other's 5 best), pearson and spearman (the
maps' correlations, negative values count as 0... no: they are kept as they are, and a constant map correlates 1
with an identical map, else 0), iou15 (intersection over union of the 15% highest pixels of each map).
Distances (0 = the same): prob_diff (the largest absolute difference of a class's probability, over the classes
both models have) and peak_dist (the distance between the maps' maxima over the image's diagonal).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import image
from ..errors import InputError, OnnxCamError
from ..pipeline import ImageFile, Runner, Target, find_images, parse_target

log = logging.getLogger(__name__)
AGREEMENT = ("top1", "top5", "pearson", "spearman", "iou15")
DISTANCES = ("prob_diff", "peak_dist")
TOP_SHARE = 0.15  # the "top region" of a map for iou15


@dataclass
class ModelSpec:
    """One model of a comparison and the options that are its own (None: its metadata's, or the default)."""

    path: Path
    layers: list[str] | None = None
    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "auto"
    bgr: bool = False
    labels: str | None = None


@dataclass
class Failure:
    image: str
    model: str | None   # None: the image itself (it could not be read)
    error: str


@dataclass
class Comparison:
    models: list[dict]                   # name, path, hash, opsets, producer, layers, preprocessing, labels, classes
    methods: list[str]
    rows: list[dict] = field(default_factory=list)       # one per image, method, class and pair
    images: list[dict] = field(default_factory=list)     # one per image compared: name, agreement, pictures
    failures: list[Failure] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def summary(self) -> list[dict]:
        """Per pair, method and figure: mean, minimum and 5th percentile over the images."""
        out = []
        keys = sorted({(r["model"], r["method"]) for r in self.rows}, key=lambda k: (self._order(k[0]), k[1]))
        for model, method in keys:
            rows = [r for r in self.rows if r["model"] == model and r["method"] == method]
            for figure in AGREEMENT + DISTANCES:
                v = np.array([r[figure] for r in rows], np.float64)
                worst = float(v.max()) if figure in DISTANCES else float(v.min())
                p = 95 if figure in DISTANCES else 5
                out.append({"model": model, "method": method, "figure": figure, "mean": float(v.mean()),
                            "worst": worst, "p5": float(np.percentile(v, p)), "images": len(rows)})
        return out

    def below(self, threshold: float) -> list[dict]:
        """The rows with an agreement figure under `threshold` (each row with the figures that are)."""
        return [{**r, "below": [f for f in AGREEMENT if r[f] < threshold]} for r in self.rows
                if any(r[f] < threshold for f in AGREEMENT)]

    def _order(self, name: str) -> int:
        return next(i for i, m in enumerate(self.models) if m["name"] == name)


# ---- opening the models ----------------------------------------------------------------------------------------
def open_models(specs: list[ModelSpec], methods: list[str], device: str = "auto") -> tuple[list[Runner], list[dict]]:
    """One Runner per model; a model that cannot be opened raises its error with the model named."""
    if len(specs) < 2:
        raise InputError(f"a comparison needs at least two models, got {len(specs)}")
    runners, infos, names = [], [], _names([s.path for s in specs])
    for k, (spec, name) in enumerate(zip(specs, names)):
        try:
            r = _Capture(spec.path, methods=methods, layers=spec.layers, size=spec.size, mean=spec.mean,
                         std=spec.std, layout=spec.layout, bgr=spec.bgr, labels=spec.labels, device=device)
            classes = _classes(r)
            proto = r.explainer.proto  # the skeleton the Runner read (opsets, producer): no second parse
        except OnnxCamError as exc:
            raise _named(exc, k, spec.path) from exc
        runners.append(r)
        infos.append({"name": name, "path": str(spec.path), "hash": r.explainer.digest,
                      "opsets": {d.domain or "ai.onnx": d.version for d in proto.opset_import},
                      "producer": f"{proto.producer_name} {proto.producer_version}".strip() or "unknown",
                      "layers": r.layers, "preprocess": r.pre.describe(), "labels": r.labels_source,
                      "classes": classes, "quantized": r.quantized or None})
    return runners, infos


class _Capture(Runner):
    """A Runner that keeps each image's logits and writes no files (the comparison writes its own pictures)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits: dict[Path, np.ndarray] = {}

    def write_report(self, rep, rgb, timings, target) -> None:
        """Runner's hook for an explained image: keep its logits, write nothing (one thread: explain_batch)."""
        for m in rep.maps:
            if m.source is not None and rep.image.base not in self.logits:
                self.logits[rep.image.base] = np.asarray(m.source.logits[m.index], np.float64).ravel()
            m.source = None  # the batch's activations are no longer needed
        if rep.image.base not in self.logits:
            rep.error = f"image {rep.image.path}: no scores came back for it"


def _classes(r: Runner) -> int:
    shape = tuple(r.explainer.score_shape(r.pre.input_shape(1)))
    if len(shape) != 2 or not isinstance(shape[1], int):
        raise InputError(f"the explained score has shape {shape}; a comparison needs a classifier's (N, classes)")
    if r.labels is not None and len(r.labels) != shape[1]:
        raise InputError(f"{len(r.labels)} class names ({r.labels_source}) for a model with {shape[1]} classes")
    return shape[1]


def _named(exc: OnnxCamError, k: int, path: Path) -> OnnxCamError:
    message = f"model {k + 1} ({path}): {exc}"
    try:
        return type(exc)(message)
    except TypeError:  # an error class with another signature
        return OnnxCamError(message)


def _names(paths: list[Path]) -> list[str]:
    """Short unique names: file names, with the folder when two share one."""
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]


def class_map(first: Runner, other: Runner, first_classes: int, other_classes: int, name: str) -> np.ndarray:
    """The other model's class index for each of the first model's classes (-1: it has no such class)."""
    a, b = first.labels, other.labels
    if a is not None and b is not None and a != b:
        where = {}
        for i, label in enumerate(b):
            where.setdefault(label, i)
        mapped = np.array([where.get(label, -1) for label in a], np.int64)
        if (mapped < 0).all():
            raise InputError(f"model {name} shares no class name with the first model: give both the same names")
        return mapped
    if first_classes != other_classes:
        raise InputError(f"model {name} has {other_classes} classes and the first model {first_classes}, and no "
                         "class names map between them: give each model its class names")
    return np.arange(first_classes)


# ---- agreement figures -----------------------------------------------------------------------------------------
def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if np.array_equal(a, b):  # exactly 1, and a constant map agrees with itself
        return 1.0
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:  # a constant map agrees only with the same map
        return 0.0
    return float(np.clip(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb), -1, 1))


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks with ties given their mean rank (Spearman's convention)."""
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (first + (counts - 1) / 2.0)[inverse.ravel()]


def _top_region(v: np.ndarray) -> np.ndarray:
    k = max(1, math.ceil(TOP_SHARE * v.size))
    idx = np.argsort(-v, kind="stable")[:k]  # ties broken by position: identical maps pick identical regions
    region = np.zeros(v.size, bool)
    region[idx] = True
    return region


def map_figures(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """pearson, spearman, iou15 and peak_dist of two maps of the same (H, W)."""
    fa, fb = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    ra, rb = _top_region(fa), _top_region(fb)
    pa = np.array(np.unravel_index(int(np.argmax(a)), a.shape), np.float64)
    pb = np.array(np.unravel_index(int(np.argmax(b)), b.shape), np.float64)
    return {"pearson": _correlation(fa, fb), "spearman": _correlation(_ranks(fa), _ranks(fb)),
            "iou15": float((ra & rb).sum() / (ra | rb).sum()),
            "peak_dist": float(np.linalg.norm(pa - pb) / math.hypot(*a.shape))}


def prediction_figures(pa: np.ndarray, pb: np.ndarray, mapping: np.ndarray) -> dict[str, float]:
    """top1, top5 and prob_diff of two probability vectors (the first model's classes mapped by `mapping`)."""
    known = mapping >= 0
    top_a = [int(mapping[c]) for c in np.argsort(-pa)[:5]]
    top_b = [int(c) for c in np.argsort(-pb)[:5]]
    return {"top1": float(top_a[0] == top_b[0]), "top5": len(set(top_a) & set(top_b)) / 5.0,
            "prob_diff": float(np.abs(pa[known] - pb[mapping[known]]).max())}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


# ---- the run ---------------------------------------------------------------------------------------------------
def compare(specs: list[ModelSpec], inputs, out: str | Path, *, methods=("gradcam",), target: str = "top1",
            device: str = "auto", batch_size: int = 8, max_pixels: int | None = image.MAX_PIXELS,
            labelled: bool = True) -> Comparison:
    """Explain the images in `inputs` with every model and compare each model with the first.

    Writes the side-by-side pictures under out/pictures/ as it goes (report.write_reports writes the rest),
    labelled (model, prediction, score, layer) or, with labelled=False, bare.
    A model that cannot be opened, or classes that cannot be mapped, raise; an image that cannot be read, or that
    one model cannot explain, is listed in Comparison.failures and the others are compared."""
    from . import report

    start = time.perf_counter()
    methods = list(dict.fromkeys(methods))
    runners, infos = open_models(specs, methods, device)
    first = runners[0]
    given = parse_target(target, first.labels)
    if given.kind == "top" and given.k != 1:
        raise InputError(f"target {target!r}: a comparison explains the first model's top-1 class or given classes")
    for c in given.classes:
        if not 0 <= c < infos[0]["classes"]:
            raise InputError(f"target class {c} is not one of the first model's {infos[0]['classes']} classes")
    maps = [class_map(first, r, infos[0]["classes"], info["classes"], info["name"])
            for r, info in zip(runners[1:], infos[1:])]
    for mapping, info in zip(maps, infos[1:]):
        missing = [c for c in given.classes if mapping[c] < 0]
        if missing:
            raise InputError(f"model {info['name']} has no class named {first.label(missing[0])!r}")
    result = Comparison(infos, methods, timings={"open_s": time.perf_counter() - start,
                                                 "explain_s": [0.0] * len(runners)})
    files = find_images(inputs, exclude=[out])
    for i in range(0, len(files), batch_size):
        _compare_batch(result, runners, maps, files[i:i + batch_size], given, Path(out), max_pixels,
                       lambda *args: report.write_picture(*args, labelled=labelled))
    result.images.sort(key=lambda e: (e["agreement"], e["image"]))
    result.timings["total_s"] = time.perf_counter() - start
    return result


def _compare_batch(result: Comparison, runners, maps, files, given: Target, out: Path, max_pixels, picture) -> None:
    batch = []
    for f in files:
        try:
            batch.append(ImageFile(f.path, f.base, rgb=image.read_image(f.path, max_pixels)))
        except OnnxCamError as exc:
            result.failures.append(Failure(str(f.path), None, str(exc)))
    if not batch:
        return
    reports = [_explain(result, 0, runners[0], batch, given)]
    for k, (r, mapping) in enumerate(zip(runners[1:], maps), start=1):
        reports.append(_explain_mapped(result, k, r, batch, reports[0], mapping, given))
    for f in batch:
        _compare_image(result, runners, maps, f, [reps.get(f.base) for reps in reports], out, picture)


def _explain(result: Comparison, k: int, runner: Runner, files: list[ImageFile], target: Target) -> dict:
    """One model's explanations of the images, by image; an image it cannot explain (numbers that are not finite
    at that image, say an fp16 build overflowing) is listed as a failure of that model, the others go on. An error
    of the model as a whole raises, naming the model."""
    t = time.perf_counter()
    reps = {}
    try:
        explained = runner.explain_batch(files, target)
    except OnnxCamError as exc:
        raise _named(exc, k, Path(result.models[k]["path"])) from exc
    for rep in explained:
        if rep.ok:
            reps[rep.image.base] = rep
        else:  # the failure line names the image already
            error = rep.error.removeprefix(f"image {rep.image.path}: ")
            result.failures.append(Failure(str(rep.image.path), result.models[k]["name"], error))
    result.timings["explain_s"][k] += time.perf_counter() - t
    return reps


def _explain_mapped(result, k, runner, files, first_reps: dict, mapping: np.ndarray, given: Target) -> dict:
    """The other model explains the first model's classes: the given ones, or each image's top-1 (the images
    grouped by that class, one batch per group)."""
    if given.kind == "classes":
        return _explain(result, k, runner, files, Target("classes", classes=tuple(int(mapping[c])
                                                                                  for c in given.classes)))
    groups: dict[int, list[ImageFile]] = {}
    for f in files:
        if f.base not in first_reps:
            continue
        c = first_reps[f.base].top[0][0]
        if mapping[c] < 0:
            result.failures.append(Failure(str(f.path), result.models[k]["name"],
                                           f"the first model's class {c} ({first_reps[f.base].top[0][1]}) "
                                           "has no class of the same name in this model"))
            continue
        groups.setdefault(int(mapping[c]), []).append(f)
    reps = {}
    for c, group in groups.items():
        reps.update(_explain(result, k, runner, group, Target("classes", classes=(c,))))
    return reps


def _compare_image(result: Comparison, runners, maps, f: ImageFile, reps: list, out: Path, picture) -> None:
    logits = [r.logits.pop(f.base, None) for r in runners]
    if any(r is None for r in reps):
        return  # the failure is listed already
    h, w = f.rgb.shape[:2]
    probs = [_softmax(z) for z in logits]
    preds = [prediction_figures(probs[0], p, m) for p, m in zip(probs[1:], maps)]
    pictures, worst = [], 1.0
    for m0 in reps[0].maps:
        group = [m0] + [_matching(rep, m0, mapping) for rep, mapping in zip(reps[1:], maps)]
        big = [image.resize_map(m.mask, (w, h)) for m in group]
        for k in range(1, len(runners)):
            row = {"image": str(f.path), "method": m0.method, "class": m0.target, "label": m0.label,
                   "model": result.models[k]["name"], "class_in_model": group[k].target,
                   "score_first": m0.score, "score_model": group[k].score,
                   "zero_map": [m.zero for m in (m0, group[k]) if m.zero] or None,
                   **preds[k - 1], **map_figures(big[0], big[k])}
            result.rows.append(row)
            worst = min(worst, row["pearson"])
        pictures.append(picture(out, f, group, big, result.models, reps))
    result.images.append({"image": str(f.path), "name": str(f.base), "agreement": worst,
                          "top1": min(p["top1"] for p in preds), "prob_diff": max(p["prob_diff"] for p in preds),
                          "predictions": [{"model": info["name"], "class": r.top[0][0], "label": r.top[0][1],
                                           "score": r.top[0][2]} for info, r in zip(result.models, reps)],
                          "pictures": pictures})


def _matching(rep, m0, mapping: np.ndarray):
    want = None if m0.target is None else int(mapping[m0.target])
    return next(m for m in rep.maps if m.method == m0.method and m.target == want)
