"""torchcam 0.5's classification metrics on onnxruntime: average drop and increase in confidence (Grad-CAM++,
arXiv 1710.11063), and deletion / insertion AUC (RISE, arXiv 1806.07421).

Both follow torchcam's definitions: a sample's class is the given one or its top class; its score is the model
output after `logits_fn` (None: the output itself; "softmax": probabilities); maps smaller than the input are
resized bilinearly (half-pixel centres, as torch's interpolate); samples whose map holds NaN are left out (counted
in nan_count). The map is given with each update, or computed by the CAM object passed as the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..cam.targets import ClassifierOutputTarget, _numpy
from ..errors import InputError
from ..utils.reshape_transforms import bilinear_resize
from ._scoring import ModelScorer, as_input, check_positive

log = logging.getLogger(__name__)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class _ClassScores:
    """What both metrics share: the model run, the scores after logits_fn, the classes, the maps."""

    def __init__(self, model, logits_fn: Callable | str | None, batch_size: int, device: str):
        self.cam = model if hasattr(model, "explainer") and callable(model) else None  # an onnxcam CAM object
        self.run = model if isinstance(model, ModelScorer) else ModelScorer(model, device=device,
                                                                            batch_size=batch_size)
        if logits_fn == "softmax":
            logits_fn = softmax
        elif logits_fn is not None and not callable(logits_fn):
            raise InputError(f"logits_fn must be None, 'softmax' or a function of the model output, not {logits_fn!r}")
        self.logits_fn = logits_fn
        self.reset()

    def scores(self, x: np.ndarray) -> np.ndarray:
        out = self.run(x).reshape(len(x), -1)
        return out if self.logits_fn is None else np.asarray(self.logits_fn(out))

    def prepare(self, input_tensor, cams, class_idx):
        """(input, scores, classes, maps at the input size) of the samples whose map has no NaN."""
        x = as_input(input_tensor)
        scores = self.scores(x)
        classes = _classes(class_idx, scores)
        if cams is None:
            if self.cam is None:
                raise InputError("give the maps (cams), or pass an onnxcam CAM object as the model to compute them")
            cams = self.cam(x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
        cams = np.asarray(_numpy(cams), np.float32)
        if cams.ndim != 3 or len(cams) != len(x):
            raise InputError(f"cams must be (N, h, w) with N = {len(x)}, not {cams.shape}")
        keep = ~np.isnan(cams).reshape(len(x), -1).any(axis=1)
        self.nan_count += int((~keep).sum())
        if cams.shape[1:] != x.shape[2:]:
            cams = bilinear_resize(cams, x.shape[2:])
        rows = np.arange(len(x))[keep]
        return x[keep], scores[keep, classes[keep]], classes[keep], cams[keep], rows

    def reset(self) -> None:
        self.total = 0
        self.nan_count = 0


class ClassificationMetric(_ClassScores):
    """Average drop, mean of max(0, y - y') / (y + 1e-7), and increase in confidence, the share of samples with
    y < y', where y is the class score of the input and y' that of the input times its map.

        metric = ClassificationMetric(model, "softmax")       # model: Explainer, path, bytes, or a CAM object
        metric.update(x, cams)                                 # cams (N, h, w); None with a CAM object
        metric.summary()                                       # {"avg_drop": ..., "conf_increase": ...}
    """

    def __init__(self, model, logits_fn: Callable | str | None = None, *, batch_size: int = 32,
                 device: str = "cpu"):
        super().__init__(model, logits_fn, batch_size, device)

    def update(self, input_tensor, cams=None, class_idx=None) -> None:
        """Add a batch: class_idx is one class for all, one per sample, or None for each sample's top class."""
        x, y, classes, cams, _ = self.prepare(input_tensor, cams, class_idx)
        if not len(x):
            return
        masked = self.scores(cams[:, None] * x)[np.arange(len(x)), classes]
        self.drop += float(np.sum(np.maximum(y - masked, 0) / (y + 1e-7)))
        self.increase += float(np.sum(y < masked))
        self.total += len(x)

    def summary(self) -> dict[str, float]:
        if self.total == 0:
            raise InputError("the metric has no sample yet: call update() first")
        return {"avg_drop": self.drop / self.total, "conf_increase": self.increase / self.total}

    def reset(self) -> None:
        super().reset()
        self.drop = 0.0
        self.increase = 0.0


class DeletionInsertionMetric(_ClassScores):
    """Deletion and insertion AUC: positions ranked by the map (highest first, ties in position order); every
    step replaces the next ceil(P / steps) of the P positions, across all channels, by the baseline (deletion) or
    restores them from the input onto the baseline (insertion); the class score against the fraction changed,
    both ends included, integrated by the trapezoid rule. Lower deletion and higher insertion are better.

    baseline: None (zeros), an array broadcastable to the input, or a function of the input batch.
    """

    def __init__(self, model, logits_fn: Callable | str | None = None, *, steps: int = 20, baseline=None,
                 batch_size: int = 32, device: str = "cpu"):
        check_positive(steps, "steps")
        super().__init__(model, logits_fn, batch_size, device)
        self.steps = steps
        self.baseline = baseline

    def update(self, input_tensor, cams=None, class_idx=None) -> None:
        """Add a batch (as ClassificationMetric.update); the per-sample curves of the last batch are kept in
        `fractions`, `deletion_curves` and `insertion_curves`."""
        x, y, classes, cams, rows = self.prepare(input_tensor, cams, class_idx)
        if not len(x):
            return
        baseline = self._baseline(as_input(input_tensor))[rows]
        flat_cams = cams.reshape(len(x), -1)
        positions = flat_cams.shape[1]
        ranks = np.argsort(np.argsort(-flat_cams, axis=1, kind="stable"), axis=1, kind="stable")
        step = -(-positions // self.steps)
        counts = [*range(0, positions, step), positions]
        fractions = np.float32(counts) / np.float32(positions)
        # curve points 1.. of deletion and 0..-1 of insertion, all samples, in one batched pass
        deletion_x = [_mix(x, baseline, ranks < k) for k in counts[1:]]
        insertion_x = [_mix(x, baseline, ranks >= k) for k in counts[:-1]]
        scored = self.scores(np.concatenate(deletion_x + insertion_x)).reshape(2 * len(counts) - 2, len(x), -1)
        picked = scored[:, np.arange(len(x)), classes].T  # (n, points)
        deletion = np.concatenate([y[:, None], picked[:, :len(counts) - 1]], axis=1)
        insertion = np.concatenate([picked[:, len(counts) - 1:], y[:, None]], axis=1)
        self.fractions, self.deletion_curves, self.insertion_curves = fractions, deletion, insertion
        self.deletion += float(np.sum(_trapezoid(deletion, fractions)))
        self.insertion += float(np.sum(_trapezoid(insertion, fractions)))
        self.total += len(x)

    def _baseline(self, x: np.ndarray) -> np.ndarray:
        if self.baseline is None:
            return np.zeros_like(x)
        base = self.baseline(x) if callable(self.baseline) else self.baseline
        try:
            return np.broadcast_to(np.asarray(_numpy(base), np.float32), x.shape)
        except ValueError as exc:
            raise InputError(f"the baseline of shape {np.shape(base)} does not broadcast to the input {x.shape}") \
                from exc

    def summary(self) -> dict[str, float]:
        if self.total == 0:
            raise InputError("the metric has no sample yet: call update() first")
        return {"deletion_auc": self.deletion / self.total, "insertion_auc": self.insertion / self.total}

    def reset(self) -> None:
        super().reset()
        self.deletion = 0.0
        self.insertion = 0.0


def _mix(x: np.ndarray, baseline: np.ndarray, from_baseline: np.ndarray) -> np.ndarray:
    """x with the flat positions marked in from_baseline (N, P) taken from the baseline, on every channel."""
    take = from_baseline.reshape(len(x), 1, *x.shape[2:])
    return np.where(take, baseline, x)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.sum((y[:, 1:] + y[:, :-1]) * np.diff(x) / 2, axis=1)


def _classes(class_idx, scores: np.ndarray) -> np.ndarray:
    n, k = scores.shape
    if class_idx is None:
        return scores.argmax(axis=1)
    if isinstance(class_idx, (int, np.integer)) and not isinstance(class_idx, bool):
        classes = np.full(n, int(class_idx))
    else:
        classes = np.asarray(class_idx).reshape(-1)
        if classes.dtype.kind not in "iu" or len(classes) != n:
            raise InputError(f"class_idx must be an int, one int per sample ({n}) or None, not {class_idx!r}")
    if np.any((classes < 0) | (classes >= k)):
        raise InputError(f"class_idx {classes.tolist()} is out of range: the model has {k} classes (0..{k - 1})")
    return classes
