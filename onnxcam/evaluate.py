"""Which map to trust: methods x metrics on image files (the `onnxcam evaluate` command; no printing here).

Images are read and preprocessed as `onnxcam explain` does, explained in batches with each method (targets: the
model's top class per image), and every perturbed copy a metric needs is scored in batches through one plain
onnxruntime session (metrics.ModelScorer). Metrics (higher is better unless said):

    deletion   deletion AUC of the softmax probability (torchcam's DeletionInsertionMetric; lower is better)
    insertion  insertion AUC of the softmax probability
    road       ROAD combined, (LeRF - MoRF) / 2 of the target score over percentiles (pytorch-grad-cam's)
    pointing   pointing-game hit rate (needs boxes)
    energy     energy pointing game: the share of the map inside the boxes (needs boxes)
    sanity     model-parameter randomization (metrics.sanity): mean Spearman correlation of the maps with those
               of the fully randomized model (lower is better; "passed" when below the threshold)

Boxes: a JSON file {"<image file name>": [[x1, y1, x2, y2], ...], ...} in the image's own pixels (the name as
given or its base name); every image needs an entry when a box metric is asked for.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, image, preprocess
from .cam.api import canonical, method_object
from .errors import InputError
from .explainer import Explainer
from .graph.load import load_model
from .metrics._scoring import ModelScorer, check_positive
from .metrics.classification import DeletionInsertionMetric, _trapezoid, softmax
from .metrics.pointing import energy_pointing_game, pointing_game
from .metrics.road import ROADCombined
from .metrics.sanity import THRESHOLD, randomization_check

log = logging.getLogger(__name__)
METRICS = ("deletion", "insertion", "road", "pointing", "energy", "sanity")
BOX_METRICS = frozenset({"pointing", "energy"})
LOWER_IS_BETTER = frozenset({"deletion", "sanity"})
DEFAULT_METRICS = ("deletion", "insertion", "road")


@dataclass
class Evaluation:
    """methods x metrics: `scores[method][metric]` is the mean over images; `per_image` the values per image."""

    model: str
    images: list[str]
    methods: list[str]
    metrics: list[str]
    layers: list[str]
    scores: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)
    sanity: dict = field(default_factory=dict)       # method -> the randomization check's report (as a dict)
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"model": self.model, "images": self.images, "layers": self.layers, "methods": self.methods,
                "metrics": self.metrics, "lower_is_better": sorted(LOWER_IS_BETTER & set(self.metrics)),
                "scores": _clean(self.scores), "per_image": _clean(self.per_image), "sanity": _clean(self.sanity),
                "settings": self.settings, "onnxcam": __version__}

    def table(self) -> str:
        """The scores as a text table, one row per method."""
        heads = [f"{m} ({'lower' if m in LOWER_IS_BETTER else 'higher'} better)" for m in self.metrics]
        rows = [[method, *(_cell(self.scores[method][m]) for m in self.metrics)] for method in self.methods]
        widths = [max(len(r[i]) for r in [["method", *heads], *rows]) for i in range(len(heads) + 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(["method", *heads], widths)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)


def evaluate(model, images, methods=("gradcam", "hirescam"), metrics=DEFAULT_METRICS, *, boxes=None,
             layers=None, steps: int = 20, batch_size: int = 8, stages: int = 4, seed: int = 0,
             device: str = "cpu", size=None, mean=None, std=None, layout: str = "auto", bgr: bool = False,
             max_pixels: int | None = image.MAX_PIXELS) -> Evaluation:
    """Score every method on every image with every metric.

    images: image paths. boxes: None, a path to the boxes JSON, or {name: [[x1, y1, x2, y2], ...]}.
    steps: deletion/insertion steps. stages: randomization stages of the sanity check. seed: ROAD's noise, the
    sanity check's weights and RandomCAM's draws.
    """
    methods = list(dict.fromkeys(canonical(m) for m in methods))
    metrics = _check_metrics(metrics, boxes)
    check_positive(steps, "steps (the deletion/insertion perturbation count)")
    check_positive(batch_size, "batch_size")
    check_positive(stages, "stages")
    paths = [Path(p) for p in images]
    if not paths:
        raise InputError("no images to evaluate")
    box_table = _read_boxes(boxes, paths) if BOX_METRICS & set(metrics) else None
    proto = load_model(model)
    pre = preprocess.resolve(proto, size=size, mean=mean, std=std, layout=layout, bgr=bgr)
    if pre.layout != "nchw":
        raise InputError("the metrics perturb (N, C, H, W) inputs; this model takes NHWC inputs")
    explainer = Explainer(proto, layers=layers, device=device, input_shape=pre.input_shape(1))
    scorer = ModelScorer(explainer, device=device, batch_size=32)
    result = Evaluation(str(model), [str(p) for p in paths], methods, list(metrics), list(explainer.layers),
                        settings={"steps": steps, "batch_size": batch_size, "seed": seed, "stages": stages,
                                  "targets": "top1", "sanity_threshold": THRESHOLD,
                                  "preprocess": pre.describe()})
    values = {m: {k: [] for k in metrics} for m in methods}
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        sizes, x = _inputs(chunk, pre, max_pixels)
        classes = np.argmax(scorer(x).reshape(len(x), -1), axis=1)
        for method in methods:
            maps = _maps(explainer, method, x, classes, seed + start)
            _warn_constant(method, maps, chunk)
            for metric, v in _scores(metric_set=metrics, x=x, maps=maps, classes=classes, scorer=scorer,
                                     steps=steps, seed=seed, boxes=_boxes_at(box_table, chunk, sizes, pre)):
                values[method][metric] += v
            if "sanity" in metrics:
                extra = {"rng": np.random.default_rng(seed + start)} if method == "randomcam" else {}
                rep = randomization_check(proto, x, method, list(explainer.layers), [int(c) for c in classes],
                                          stages=stages, seed=seed, device=device, **extra)
                values[method]["sanity"] += [float(v) for v in rep.stages[-1].spearman]
                result.sanity.setdefault(method, []).append(rep.as_dict())
    for method in methods:
        result.per_image[method] = values[method]
        result.scores[method] = {k: float(np.mean(v)) for k, v in values[method].items()}
    return result


def write_json(path, evaluation: Evaluation) -> None:
    """The evaluation as strict JSON (no NaN: a value that is not finite is null)."""
    from .files import write_json as _write

    _write(Path(path), evaluation.as_dict())


def _check_metrics(metrics, boxes) -> list[str]:
    metrics = list(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise InputError(f"unknown metric {', '.join(unknown) or '(none)'}; choose from {', '.join(METRICS)}")
    needing = [m for m in metrics if m in BOX_METRICS]
    if needing and boxes is None:
        raise InputError(f"metric {', '.join(needing)} needs the objects' boxes (a boxes JSON file)")
    return metrics


def _inputs(paths: list[Path], pre, max_pixels) -> tuple[list[tuple[int, int]], np.ndarray]:
    sizes, xs = [], []
    for p in paths:
        rgb = image.read_image(p, max_pixels)
        sizes.append(rgb.shape[:2])
        xs.append(image.to_input(rgb, pre))
    return sizes, np.stack(xs)


def _maps(explainer: Explainer, method: str, x: np.ndarray, classes: np.ndarray, seed: int) -> np.ndarray:
    """(N, H, W) maps in [0, 1] at the input size; the guided methods' colour maps as their largest magnitude."""
    from .pipeline import _as_masks, _own_targets

    options = {"rng": np.random.default_rng(seed)} if method == "randomcam" else {}  # reproducible tables
    obj = method_object(explainer, method, channels_last=False, **options)  # a (N, C) layer is refused there, in one line
    maps = obj(x, _own_targets(method, obj, x, classes))
    return _as_masks(maps)


def _scores(*, metric_set, x, maps, classes, scorer, steps, seed, boxes):
    """Yield (metric, per-image values) for the metrics that need no new maps."""
    if "deletion" in metric_set or "insertion" in metric_set:
        di = DeletionInsertionMetric(scorer, softmax, steps=steps)
        di.update(x, maps, classes)
        curves = {"deletion": di.deletion_curves, "insertion": di.insertion_curves}
        for k in ("deletion", "insertion"):
            if k in metric_set:
                yield k, [float(v) for v in _trapezoid(curves[k], di.fractions)]
    if "road" in metric_set:
        with _quiet(logging.getLogger("onnxcam.metrics.road")):  # constant maps were named once above
            road = ROADCombined(rng=seed)(x, maps, [int(c) for c in classes], scorer)
        yield "road", [float(v) for v in road]
    if "pointing" in metric_set:
        yield "pointing", [float(v) for v in pointing_game(maps, boxes)]
    if "energy" in metric_set:
        yield "energy", [float(v) for v in energy_pointing_game(maps, boxes)]


def _warn_constant(method: str, maps: np.ndarray, paths: list[Path]) -> None:
    """One line per method and batch naming the images whose map is constant (e.g. zero everywhere): their
    perturbation metrics rank the positions in pixel order, not by the map."""
    flat = maps.reshape(len(maps), -1)
    constant = [p.name for p, m in zip(paths, flat) if m.max() == m.min()]
    if constant:
        log.warning("%s: the map of %s is constant; its deletion, insertion and ROAD scores do not rank by the map",
                    method, ", ".join(constant))


class _quiet:
    """Raise a logger's level to ERROR for the duration of a with block."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.level = logger, logger.level

    def __enter__(self):
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _read_boxes(boxes, paths: list[Path]) -> dict:
    if isinstance(boxes, (str, Path)):
        try:
            boxes = json.loads(Path(boxes).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"boxes file {boxes}: {exc}") from None
    if not isinstance(boxes, dict):
        raise InputError("the boxes must be a JSON object {\"<image name>\": [[x1, y1, x2, y2], ...]}")
    table = {}
    for p in paths:
        entry = boxes.get(str(p), boxes.get(p.name))
        if entry is None:
            raise InputError(f"the boxes file has no entry for image {p} (keys are image names, e.g. {p.name!r})")
        try:
            arr = np.asarray(entry, np.float64).reshape(-1, 4)
        except (TypeError, ValueError):
            raise InputError(f"the boxes of {p.name} are not [[x1, y1, x2, y2], ...]: {entry!r}") from None
        if not np.isfinite(arr).all():
            raise InputError(f"the boxes of {p.name} hold a value that is not finite")
        table[p] = arr
    return table


def _boxes_at(table, paths: list[Path], sizes, pre) -> list | None:
    """Boxes in model-input pixels (images are stretched to the input size)."""
    if table is None:
        return None
    h, w = pre.size
    return [table[p] * np.array([w / s[1], h / s[0], w / s[1], h / s[0]]) for p, s in zip(paths, sizes)]


def _cell(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"


def _clean(obj):
    """NaN/Inf -> None, for strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
