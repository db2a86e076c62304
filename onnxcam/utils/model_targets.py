"""pytorch-grad-cam 1.5.7's `utils.model_targets`: every target class, on numpy outputs.

A target is called on one sample's output (`target(output)`, the score a metric reads) and gives the gradient of
that score with respect to the output (`seed(output)`, what the CAM classes differentiate; see onnxcam.cam.targets).
Five classes are onnxcam.cam.targets' own; this module adds the four that were missing there.
"""

from __future__ import annotations

import numpy as np

from ..cam import targets as _base
from ..cam.targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    RawScoresOutputTarget,
    SemanticSegmentationTarget,
)
from ..errors import InputError

__all__ = [
    "BinaryClassifierOutputTarget",
    "ClassifierOutputReST",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "FasterRCNNBoxScoreTarget",
    "FinerWeightedTarget",
    "RawScoresOutputTarget",
    "SemanticSegmentationTarget",
    "SoftmaxOutputTarget",
    "as_target",
]


class ClassifierOutputReST(ClassifierOutputTarget):
    """ReST (arXiv 2501.06261): the logit minus the cross-entropy of the class, z_c - CE(z, c) = 2 z_c - logsumexp(z).
    Its seed 2 onehot_c - softmax(z) needs the logits (a first run)."""

    needs_output = True

    def __call__(self, model_output: np.ndarray):
        z = np.asarray(model_output)
        return 2 * _pick(z, self.category) - _logsumexp(z)

    def seed(self, output: np.ndarray) -> np.ndarray:
        _base._expect_vector(self, output)
        _base._check_class(self, output.shape[0])
        seed = -_base._softmax(np.asarray(output, np.float64))
        seed[self.category] += 2
        return seed.astype(np.float32)


class SoftmaxOutputTarget:
    """All class probabilities, softmax(z) (a vector per sample: for metrics and gradient-free methods).

    Their sum is 1 whatever the logits, so its gradient is identically zero: seed() refuses rather than return a
    map of nothing (pytorch-grad-cam's backward fails on the non-scalar)."""

    needs_output = False

    def __call__(self, model_output: np.ndarray):
        return _base._softmax(np.asarray(model_output))

    def seed(self, output: np.ndarray) -> np.ndarray:
        raise InputError("SoftmaxOutputTarget scores every class's probability; they sum to 1, so the gradient is "
                         "zero: use ClassifierOutputSoftmaxTarget(category) to explain one class's probability")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FinerWeightedTarget:
    """Finer-CAM's score (arXiv 2501.11309): sum_j p_j (z_main - alpha z_j) / (sum_j p_j + 1e-9) over the comparison
    classes j, with p = softmax(z). As in pytorch-grad-cam the weights p_j are differentiated too, so the seed
    needs the logits (a first run)."""

    needs_output = True

    def __init__(self, main_category: int, comparison_categories, alpha: float):
        self.main_category = int(main_category)
        self.comparison_categories = [int(c) for c in comparison_categories]
        self.alpha = float(alpha)
        if not self.comparison_categories:
            raise InputError("FinerWeightedTarget needs at least one comparison category")

    def __call__(self, model_output: np.ndarray):
        z = np.asarray(model_output)
        p = _base._softmax(z)
        main = _pick(z, self.main_category)
        num = sum(_pick(p, j) * (main - self.alpha * _pick(z, j)) for j in self.comparison_categories)
        return num / (sum(_pick(p, j) for j in self.comparison_categories) + 1e-9)

    def seed(self, output: np.ndarray) -> np.ndarray:
        _base._expect_vector(self, output)
        k = output.shape[0]
        for c in (self.main_category, *self.comparison_categories):
            if not 0 <= c < k:
                raise InputError(f"{self!r}: class {c} is out of range, the model has {k} classes (0..{k - 1})")
        z = np.asarray(output, np.float64)
        p = _base._softmax(z)
        eye = np.eye(k)
        # score = N / D; dp_j/dz = p_j (e_j - p); each listed class counts once per listing, as in the sums
        num = sum(p[j] * (z[self.main_category] - self.alpha * z[j]) for j in self.comparison_categories)
        den = sum(p[j] for j in self.comparison_categories) + 1e-9
        d_num = sum(p[j] * (eye[j] - p) * (z[self.main_category] - self.alpha * z[j])
                    + p[j] * (eye[self.main_category] - self.alpha * eye[j]) for j in self.comparison_categories)
        d_den = sum(p[j] * (eye[j] - p) for j in self.comparison_categories)
        return (d_num / den - num * d_den / den**2).astype(np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.main_category}, {self.comparison_categories}, alpha={self.alpha})"


class FasterRCNNBoxScoreTarget:
    """For each reference box (labels[i], bounding_boxes[i] as x1, y1, x2, y2): the predicted box of highest IoU with
    it, if that IoU exceeds iou_threshold and its label matches, adds IoU + its score; the total is the target.

    Works on a detector's post-processed outputs as a dict of arrays {"boxes": (B, 4), "labels": (B,), "scores":
    (B,)}, as torchvision's Faster R-CNN returns them. onnxcam does not yet differentiate a whole detector with its
    post-processing, so seed() gives the gradient as a dict of the same keys (zero for labels): d/dscores is 1 at each
    matched box, d/dboxes the IoU's gradient there."""

    needs_output = True

    def __init__(self, labels, bounding_boxes, iou_threshold: float = 0.5):
        self.labels = np.asarray(_base._numpy(labels)).reshape(-1)
        self.bounding_boxes = np.asarray(_base._numpy(bounding_boxes), np.float64).reshape(-1, 4)
        if len(self.labels) != len(self.bounding_boxes):
            raise InputError(f"FasterRCNNBoxScoreTarget: {len(self.labels)} labels for {len(self.bounding_boxes)} "
                             "boxes; give one label per box")
        self.iou_threshold = float(iou_threshold)

    def _matches(self, boxes: np.ndarray, labels: np.ndarray) -> list[tuple[np.ndarray, int, float]]:
        """(reference box, matched predicted box index, IoU) per reference box that counts."""
        found = []
        for ref, label in zip(self.bounding_boxes, self.labels) if len(boxes) else ():
            ious = _iou(ref, boxes)
            i = int(np.argmax(ious))
            if ious[i] > self.iou_threshold and labels[i] == label:
                found.append((ref, i, float(ious[i])))
        return found

    def __call__(self, model_outputs: dict):
        boxes, labels, scores = _detections(model_outputs)
        return np.float64(sum(iou + scores[i] for _, i, iou in self._matches(boxes, labels)))

    def seed(self, outputs: dict) -> dict:
        boxes, labels, scores = _detections(outputs)
        d_boxes, d_scores = np.zeros(boxes.shape), np.zeros(scores.shape)
        for ref, i, _ in self._matches(boxes, labels):
            d_scores[i] += 1
            d_boxes[i] += _iou_gradient(ref, boxes[i])
        return {"boxes": d_boxes.astype(np.float32), "labels": np.zeros(labels.shape, np.float32),
                "scores": d_scores.astype(np.float32)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.labels)} boxes, iou_threshold={self.iou_threshold})"


def as_target(target):
    """onnxcam.cam.targets.as_target, knowing also this module's classes by name: pytorch-grad-cam's
    ClassifierOutputReST, SoftmaxOutputTarget and FinerWeightedTarget objects become their numpy equivalents."""
    name = type(target).__name__
    if not callable(getattr(target, "seed", None)):
        if name == "ClassifierOutputReST":
            return ClassifierOutputReST(target.category)
        if name == "SoftmaxOutputTarget":
            return SoftmaxOutputTarget()
        if name == "FinerWeightedTarget":
            return FinerWeightedTarget(target.main_category, target.comparison_categories, target.alpha)
        if name == "FasterRCNNBoxScoreTarget":
            return FasterRCNNBoxScoreTarget(target.labels, target.bounding_boxes, target.iou_threshold)
    return _base.as_target(target)


def _pick(x: np.ndarray, idx: int):
    return x[idx] if x.ndim == 1 else x[..., idx]


def _logsumexp(z: np.ndarray):
    top = z.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[..., 0]


def _detections(outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(outputs, dict) or not {"boxes", "labels", "scores"} <= set(outputs):
        raise InputError("FasterRCNNBoxScoreTarget needs a detector's outputs as a dict with 'boxes' (B, 4), "
                         "'labels' (B,) and 'scores' (B,)")
    boxes = np.asarray(_base._numpy(outputs["boxes"]), np.float64).reshape(-1, 4)
    return boxes, np.asarray(_base._numpy(outputs["labels"])).reshape(-1), \
        np.asarray(_base._numpy(outputs["scores"]), np.float64).reshape(-1)


def _iou(ref: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x1, y1, x2, y2) box with each of (B, 4), as torchvision.ops.box_iou."""
    w = np.clip(np.minimum(ref[2], boxes[:, 2]) - np.maximum(ref[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(ref[3], boxes[:, 3]) - np.maximum(ref[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (ref[2] - ref[0]) * (ref[3] - ref[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def _iou_gradient(ref: np.ndarray, box: np.ndarray) -> np.ndarray:
    """d IoU(ref, box) / d box, for overlapping boxes (a match has IoU > threshold >= 0)."""
    x1, y1 = max(ref[0], box[0]), max(ref[1], box[1])
    x2, y2 = min(ref[2], box[2]), min(ref[3], box[3])
    w, h = x2 - x1, y2 - y1
    inter = w * h
    union = (ref[2] - ref[0]) * (ref[3] - ref[1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
    # d inter / d box: a coordinate of the box moves the intersection only where it is the binding edge (at an
    # exact tie with the reference's edge, a kink, it is taken as not binding)
    d_inter = np.array([-h if box[0] > ref[0] else 0.0, -w if box[1] > ref[1] else 0.0,
                        h if box[2] < ref[2] else 0.0, w if box[3] < ref[3] else 0.0])
    d_area = np.array([-(box[3] - box[1]), -(box[2] - box[0]), box[3] - box[1], box[2] - box[0]])
    d_union = d_area - d_inter
    return d_inter / union - inter * d_union / union**2
